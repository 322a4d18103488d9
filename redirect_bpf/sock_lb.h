// Socket-level service load balancing (issue 16): map keys and values. Every struct has one
// Python mirror in redirect_bpf/sock_lb_structs.py; tests/kernel/test_sock_lb.py checks sizes.
#ifndef L7PROXY_SOCK_LB_H
#define L7PROXY_SOCK_LB_H

#ifndef LB_SERVICE_MAP_SIZE
#define LB_SERVICE_MAP_SIZE 65536
#endif
#ifndef LB_REV_MAP_SIZE
#define LB_REV_MAP_SIZE 131072  // two revisions per service while a change is written
#endif
#ifndef LB_BACKEND_MAP_SIZE
#define LB_BACKEND_MAP_SIZE 262144
#endif
#ifndef LB_MAGLEV_MAP_SIZE
// Maglev table chunks (16 KiB each, allocated on use): 4096 services at M = 16381 (4 chunks),
// 512 at M = 131071 (32 chunks)
#define LB_MAGLEV_MAP_SIZE 16384
#endif
#ifndef LB_AFFINITY_MAP_SIZE
#define LB_AFFINITY_MAP_SIZE 65536
#endif
#ifndef LB_REVNAT_MAP_SIZE
#define LB_REVNAT_MAP_SIZE 262144
#endif
// A service's Maglev table has M slots, M a prime chosen per service from its backend count
// (l7proxy/services/maglev.py, 16381..131071); it is stored in chunks of MAGLEV_CHUNK slots.
#define MAGLEV_CHUNK_SHIFT 12
#define MAGLEV_CHUNK (1 << MAGLEV_CHUNK_SHIFT)
#define MAGLEV_MAX_M 131071

#define LB_FLAG_AFFINITY 1
#define LB_FLAG_MAGLEV 2

// VIP:port:proto -> service (Cilium: lb4_key with backend_slot 0)
struct lb_svc_key {
    __be32 vip;
    __be16 port;
    __u8 proto;
    __u8 pad;
};

// The service's current revision. A change never rewrites what a concurrent connect() may be
// reading: the agent writes a new revision (its lb_revs entry, slots, Maglev rows, new
// backends), points this entry at it, waits out an RCU grace period, and only then deletes the
// old revision and the backends it alone used (redirect_bpf/sock_lb.py).
struct lb_svc {
    __u32 rev;
    __u32 pad;
};

// One revision of a service, never modified while in use. `svc` names the service it belongs
// to: a hash map element freed by an update of lb_services can be reused at once for another
// key, so a reader checks that the revision it found is its own service's.
struct lb_rev {
    struct lb_svc_key svc;
    __u32 svc_id;     // stable while the service lives: affinity and the counters
    __u16 count;      // backend slots 1..count in lb_slots
    __u8 flags;       // LB_FLAG_*
    __u8 pad;
    __u32 affinity_timeout_s;
    __u32 maglev_m;  // the Maglev table's size (LB_FLAG_MAGLEV), else 0
};

// (revision, slot 1..count) -> backend id: random selection picks a slot
struct lb_slot_key {
    __u32 rev;
    __u32 slot;
};

struct lb_backend {
    __be32 ip;
    __be16 port;
    __u8 proto;
    __u8 pad;
};

// One Maglev lookup table per revision, in chunks: (revision, slot / MAGLEV_CHUNK) -> the
// backend ids of those slots
struct lb_maglev_key {
    __u32 rev;
    __u32 chunk;
};

struct lb_maglev_chunk {
    __u32 ids[MAGLEV_CHUNK];
};

// Session affinity: the client (its network namespace) and the service -> backend
struct lb_affinity_key {
    __u64 netns_cookie;
    __u32 svc_id;
    __u32 pad;
};

struct lb_affinity_val {
    __u32 backend_id;
    __u32 pad;
    __u64 last_ns;
};

// Per-service counters (the agent's l7proxy_service_* metrics): translations at connect()
// (TCP, connected UDP) and sendmsg() (each datagram of an unconnected UDP socket), calls
// that failed because the service had no backend, and new NodePort flows. Reset when a
// service id is (re)assigned.
struct lb_svc_stats {
    __u64 connects;
    __u64 datagrams;
    __u64 no_backend;
    __u64 nodeport;  // new NodePort flows (nodeport.c), by the frontend they came through
};

// Reverse translation for getpeername()/recvmsg(): socket + backend address -> VIP
struct lb_revnat_key {
    __u64 cookie;
    __be32 ip;
    __be16 port;
    __u16 pad;
};

struct lb_revnat_val {
    __be32 vip;
    __be16 port;
    __u16 pad;
};

#endif
