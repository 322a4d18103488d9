// Per-packet service load balancing for traffic entering a node (NodePort, VIPs): map keys and
// values. Every struct has one Python mirror in redirect_bpf/nodeport_structs.py;
// tests/kernel/test_nodeport_layout.py checks them against what bcc reports.
#ifndef L7PROXY_NODEPORT_H
#define L7PROXY_NODEPORT_H

#ifndef NP_FRONTEND_MAP_SIZE
#define NP_FRONTEND_MAP_SIZE 131072  // every service's VIP and node port
#endif
#ifndef NP_CT_MAP_SIZE
#define NP_CT_MAP_SIZE 262144
#endif
#ifndef NP_AFFINITY_MAP_SIZE
#define NP_AFFINITY_MAP_SIZE 65536
#endif
#ifndef NP_SNAT_RETRIES
#define NP_SNAT_RETRIES 8  // random ports tried when the client's own port is taken
#endif

#define NP_FRONTEND_DSR 1  // --dsr: the backend's node answers the client directly

// np_ct.flags: how the flow was forwarded
#define NP_CT_LOCAL 1  // backend on this node: DNAT only
#define NP_CT_SNAT 2   // another node: DNAT + SNAT to this node, answers come back here
#define NP_CT_DSR 4    // another node: DNAT, the service address in an IP option
#define NP_CT_GONE 8   // the backend was deleted (set by the agent): the flow is reset
#define NP_CT_CLOSING 16  // the client sent FIN or RST: the agent's GC removes it once idle

// np_rev.flags: what a packet matching the key gets
#define NP_REV_SRC 1   // leaving by the underlay: its source becomes the frontend
#define NP_REV_SNAT 2  // an answer to a SNATed flow: source -> frontend, destination -> client

// The IPv4 option that carries the service address to the backend's node (Cilium's choice:
// copied flag set, class 0, number 26 = 0x9a; 8 bytes: type, length, port, address).
#define DSR_OPT_TYPE 0x9a
#define DSR_OPT_LEN 8

// A frontend: {node IP as 0, node port, proto} or {VIP, port, proto}
struct np_frontend_key {
    __be32 addr;
    __be16 port;
    __u8 proto;
    __u8 pad;
};

// -> the service's key in lb_services (the socket LB's maps hold backends and Maglev rows)
struct np_frontend {
    __be32 vip;
    __be16 vport;
    __u8 flags;  // NP_FRONTEND_*
    __u8 pad;
};

struct np_config {
    __be32 node_ip;  // this node's underlay address: NodePort's address and the SNAT source
    __u32 flags;
};

// A flow as one hook sees it (conntrack key and reverse-NAT key)
struct np_tuple {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 pad;
    __u16 pad2;
};

// The client's flow -> where it goes (so a flow keeps its backend while backends change)
struct np_ct {
    __be32 backend_ip;
    __be16 backend_port;
    __be16 nat_port;   // the SNAT source port (NP_CT_SNAT)
    __u32 backend_id;
    __u8 flags;        // NP_CT_*
    __u8 pad;
    __u16 pad2;
    __u64 last_ns;
};

// A reply's tuple -> the addresses it must carry
struct np_rev {
    __be32 front_ip;
    __be16 front_port;
    __be16 client_port;
    __be32 client_ip;
    __u8 flags;        // NP_REV_*
    __u8 pad;
    __u16 pad2;
};

// Client-IP affinity for NodePort (the socket LB keys its own by network namespace)
struct np_affinity_key {
    __be32 client_ip;
    __u32 svc_id;
};

struct np_affinity_val {
    __u32 backend_id;
    __u32 pad;
    __u64 last_ns;
};

#endif
