// Shared definitions of the l7proxy datapath: constants, map key/value structs, event record.
// Every struct here has exactly one Python mirror in redirect_bpf/structs.py; the kernel test
// tests/kernel/test_struct_layout.py checks sizes and offsets against what bcc reports.
#ifndef L7PROXY_DATAPATH_H
#define L7PROXY_DATAPATH_H

// Sizes only (-D may override them); everything switchable at runtime lives in the config map.
#ifndef POLICY_MAP_SIZE
#define POLICY_MAP_SIZE 65536
#endif
#ifndef IPCACHE_SIZE
#define IPCACHE_SIZE 65536
#endif
#ifndef CT_MAP_SIZE
#define CT_MAP_SIZE 262144
#endif
// IPv6 flows get their own conntrack (conntrack6, 44-byte keys), smaller by default: an LRU map
// allocates all its entries up front.
#ifndef CT6_MAP_SIZE
#define CT6_MAP_SIZE 65536
#endif
#ifndef ENDPOINT_MAP_SIZE
#define ENDPOINT_MAP_SIZE 1024
#endif
#ifndef EVENT_RING_SIZE
#define EVENT_RING_SIZE (1 << 20)
#endif
#ifndef SIDECAR_MAP_SIZE
#define SIDECAR_MAP_SIZE 65536
#endif
#ifndef NODE_MAP_SIZE
#define NODE_MAP_SIZE 4096
#endif

#define DIR_INGRESS 0
#define DIR_EGRESS 1

#define IDENTITY_ANY 0
#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2
#define IDENTITY_REMOTE_NODE 6  // another node's own addresses (not its pods)
// An IPv6 peer the ipcache does not know (Cilium's dual-stack world-ipv6); an unknown IPv4 peer
// stays IDENTITY_WORLD, so the IPv4 path and its events are what they were.
#define IDENTITY_WORLD_IPV6 10

// skb/socket marks. The proxy marks its upstream sockets FROM_PROXY | source identity so the
// destination's ingress check sees the real source and the packets are never redirected again.
// TO_PROXY is set on packets assigned to a proxy socket; an ip rule routes it to the local table.
#define MARK_MAGIC_MASK 0xFF000000
#define MARK_IDENTITY_MASK 0x00FFFFFF
#define MARK_FROM_PROXY 0x7A000000
#define MARK_TO_PROXY 0x7B000000
// Set by from_overlay on a decapsulated packet from a known node: the identity is the VNI.
#define MARK_FROM_OVERLAY 0x7C000000

#define VERDICT_FORWARDED 0
#define VERDICT_DROPPED 1
#define VERDICT_REDIRECTED 2

#define REASON_NONE 0
#define REASON_POLICY_DENIED 1  // no allowing entry and the direction is enforced
#define REASON_POLICY_DENY 2    // an explicit deny entry matched
#define REASON_NO_PROXY 3       // redirect wanted but no proxy socket is listening
#define REASON_CT_REPLY 4       // forwarded as the reply of a tracked flow
#define REASON_CT_ESTABLISHED 5 // forwarded as part of a tracked flow
#define REASON_NEW_FLOW 6       // forwarded after a policy lookup
#define REASON_UNKNOWN_TUNNEL_SOURCE 7  // VXLAN from an address that is no known node
#define REASON_INVALID_IDENTITY 8       // VXLAN carrying identity 0 or host (never sent)
#define REASON_NO_TUNNEL_ENDPOINT 9     // a cluster address no known node owns
#define REASONS 16              // counter slots per verdict

#define MATCH_NONE 0
#define MATCH_L3 1  // identity-specific entry
#define MATCH_L4 2  // L4-only entry (identity 0)

#define EP_INGRESS_ENFORCED 1
#define EP_EGRESS_ENFORCED 2

#define CT_REDIRECTED 1
#define CT_SEEN_REPLY 2
#define CT_CLOSING 4
#define CT_MACS 8          // pod_mac/host_mac learned (valid while mac_gen is config.ep_gen)

#define CFG_EVENTS_FORWARDED 1  // emit an event for every new forwarded/redirected flow
#define CFG_HOST_ROUTING 2      // to a pod of this node: bpf_redirect_peer, not the host stack

// Policy keys are LPM trie keys: endpoint, identity and direction always match in full,
// proto 0 is "any" (prefix stops before it), the port (big endian) matches on prefixlen - 80 bits.
struct policy_key {
    __u32 prefixlen;
    __u32 endpoint_id;
    __u32 identity;
    __u8 direction;
    __u8 proto;
    __be16 dport;
};

struct policy_value {
    __u16 proxy_port;      // host order; redirect with port 0 = no proxy (fail closed)
    __u8 deny;
    __u8 redirect;
    __u8 key_proto;        // of the stored key, reported in events
    __u8 key_prefix_len;   // port prefix of the stored key, 0..16
    __u16 pad;
    __u32 l7_id;
};

struct ipcache_key {
    __u32 prefixlen;
    __be32 addr;
};

// The IPv6 twin of the ipcache (ipcache6): the same values, 128-bit prefixes.
struct ipcache6_key {
    __u32 prefixlen;
    __be32 addr[4];
};

struct ipcache_value {
    __u32 identity;
    __be32 tunnel_endpoint; // underlay IP of the node owning the address; 0 = this node / none
};

// A known node, keyed by its underlay IP (network byte order): only these may send VXLAN.
struct node_info {
    __u32 node_id;          // userspace's handle, reported nowhere in the kernel
    __u32 flags;
};

struct endpoint_info {
    __u32 endpoint_id;
    __u32 identity;
    __u32 ifindex;
    __be32 ipv4;
    __u8 flags;            // EP_*_ENFORCED
    __u8 pad;
    __u16 sidecar_port;    // host order; 0 = node mode
    __be32 ipv6[4];        // all zero: the endpoint has no IPv6 address
};

// Key of ep_by_ip6: an endpoint's IPv6 address.
struct ip6_key {
    __be32 addr[4];
};

struct ct_key {
    __be32 addr_lo;        // the flow's two ends in a fixed order (lower address first)
    __be32 addr_hi;
    __be16 port_lo;
    __be16 port_hi;
    __u8 proto;
    __u8 pad;
    __u16 pad2;
    __u32 ifindex;         // the endpoint's host-side veth: both its hooks share the entry
};

// The IPv6 twin of ct_key (conntrack6): the same fields with 128-bit addresses. Its value is
// struct ct_entry with orig_saddr 0 (the initiator is the end that saw direction's hook).
struct ct6_key {
    __be32 addr_lo[4];
    __be32 addr_hi[4];
    __be16 port_lo;
    __be16 port_hi;
    __u8 proto;
    __u8 pad;
    __u16 pad2;
    __u32 ifindex;
};

struct ct_entry {
    __u64 expires_ns;      // CLOCK_MONOTONIC (coarse), compared by the userspace GC
    __u32 src_identity;
    __u32 dst_identity;
    __u32 policy_gen;      // config.policy_gen when last checked; a change re-checks the flow
    __u32 endpoint_id;
    __be32 orig_saddr;     // the initiator's end
    __be16 orig_sport;
    __u16 proxy_port;
    __u8 flags;            // CT_*
    __u8 tcp_flags;        // union of TCP flags seen
    __u8 direction;        // hook that saw the first packet: DIR_EGRESS (from-endpoint) or DIR_INGRESS
    __u8 pad;
    __u32 refreshed;       // low 32 bits of jiffies when expires_ns was last written
    __u32 deliver_ifindex; // packets leaving the endpoint go to this local endpoint's veth (0: the stack)
    __u32 deliver_gen;     // config.ep_gen when deliver_ifindex was looked up
    __u32 mac_gen;         // config.ep_gen when the MACs below were learned (CT_MACS)
    __u8 pod_mac[6];       // the endpoint's MAC (pod side of its veth), from its own packets
    __u8 host_mac[6];      // the host side of its veth
};

struct dp_config {
    __u32 policy_gen;
    __u32 flags;           // CFG_*
    __u32 ct_tcp_syn_s;
    __u32 ct_tcp_established_s;
    __u32 ct_tcp_close_s;
    __u32 ct_udp_s;
    __u32 ct_other_s;
    __u32 ep_gen;          // bumped whenever a local endpoint's address or veth changes
};

struct counter {
    __u64 packets;
    __u64 bytes;
};

struct flow_event {
    __u64 ts_ns;
    __u32 src_identity;
    __u32 dst_identity;
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u32 endpoint_id;
    __u8 proto;
    __u8 direction;
    __u8 verdict;
    __u8 reason;
    __u16 proxy_port;
    __u8 match;            // MATCH_*
    __u8 match_prefix_len;
    __u32 match_identity;
    __u8 match_proto;
    __u8 match_deny;
    __u16 match_port;      // host order, already masked to the prefix
};

// An IPv6 flow's event: the IPv4 record (saddr/daddr 0) followed by the two addresses. The
// reader tells the two apart by the record's size.
struct flow_event6 {
    struct flow_event base;
    __be32 saddr6[4];
    __be32 daddr6[4];
};

// One sidecar connection, as both ends see it: 127.0.0.1 is in every endpoint's namespace, so
// the client's address alone would let one endpoint's sidecar read another's entry.
struct sidecar_addr {
    __u64 netns;           // network namespace cookie (bpf_get_netns_cookie, SO_NETNS_COOKIE)
    __be32 ip;             // the client's local address
    __be16 port;           // the client's local port
    __be16 proxy_port;     // the sidecar listener's port (the rewritten destination)
};

// sidecar_orig.flags: who has seen the entry, so the last of the two deletes it.
#define SIDECAR_READ 1          // a proxy's getsockopt(SO_ORIGINAL_DST) answered from it
#define SIDECAR_CLIENT_CLOSED 2 // the client's socket closed before any proxy read it

struct sidecar_orig {
    __be32 daddr;          // 0 for an IPv6 destination (then daddr6)
    __be16 dport;
    __u16 flags;           // SIDECAR_*
    __u32 src_identity;
    __u32 dst_identity;
    __be32 daddr6[4];      // a native IPv6 destination of connect6, else zero
};

#endif
