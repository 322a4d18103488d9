// Per-packet service load balancing for traffic that enters a node from outside (issue 16):
// NodePort (this node's underlay IP : node port) and service VIPs sent to the node by hosts
// without the socket LB's cgroup hooks. Two tc programs on the underlay device, loaded apart
// from datapath.c by redirect_bpf/nodeport.py:
//
//   np_from_netdev (ingress, before the datapath's own program there; TC_ACT_UNSPEC passes on)
//     - a frontend: pick a backend (conntrack, affinity, the socket LB's Maglev row or slots)
//         local backend  -> DNAT, on to the stack (to_endpoint judges the client's identity)
//         other node     -> DNAT + SNAT to this node, forwarded by a FIB lookup (the cluster's
//                           tunnel or native route); --dsr: DNAT, the service address in an IP
//                           option, the client's address kept
//     - an answer to a SNATed flow -> back to the frontend's address, forwarded to the client
//     - (backend's node) a DSR packet, native or inside VXLAN: note the service address
//   np_to_netdev (egress): a local backend's answer (plain or DSR) leaves with the frontend's
//     address as its source.
//
// The service maps are the socket LB's (sock_lb.c), opened from their pins, so both choose a
// backend from the same Maglev row; the datapath's endpoint, ipcache and node maps likewise.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "datapath.h"
#include "sock_lb.h"
#include "nodeport.h"

#define NSEC 1000000000ULL
#define AF_INET 2
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_RST 0x04
#define VXLAN_PORT 4789
#define IP_OFF ETH_HLEN
// bcc 0.26 declares bpf_redirect_neigh with 3 arguments; the kernel's helper (5.10) takes 4
static long (*redirect_neigh)(__u32 ifindex, void *params, int plen, __u64 flags) =
    (void *)BPF_FUNC_redirect_neigh;
#define NP_PIN(name) NP_PIN_DIR "/" name  // -DNP_PIN_DIR: where the shared maps are pinned

// Shared, opened from the pins of the socket LB and of the datapath
BPF_TABLE_PINNED("hash", struct lb_svc_key, struct lb_svc, lb_services, LB_SERVICE_MAP_SIZE,
                 NP_PIN("map_lb_services"));
BPF_TABLE_PINNED("hash", __u32, struct lb_rev, lb_revs, LB_REV_MAP_SIZE, NP_PIN("map_lb_revs"));
BPF_TABLE_PINNED("hash", struct lb_slot_key, __u32, lb_slots, LB_BACKEND_MAP_SIZE,
                 NP_PIN("map_lb_slots"));
BPF_TABLE_PINNED("hash", __u32, struct lb_backend, lb_backends, LB_BACKEND_MAP_SIZE,
                 NP_PIN("map_lb_backends"));
BPF_TABLE_PINNED("hash", struct lb_maglev_key, struct lb_maglev_chunk, lb_maglev,
                 LB_MAGLEV_MAP_SIZE, NP_PIN("map_lb_maglev"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct lb_svc_stats, lb_svc_stats, LB_SERVICE_MAP_SIZE,
                 NP_PIN("map_lb_svc_stats"));
BPF_TABLE_PINNED("hash", __be32, struct endpoint_info, ep_by_ip, ENDPOINT_MAP_SIZE,
                 NP_PIN("map_ep_by_ip"));
BPF_TABLE_PINNED("lpm_trie", struct ipcache_key, struct ipcache_value, ipcache, IPCACHE_SIZE,
                 NP_PIN("map_ipcache"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __be32, struct node_info, nodes, NODE_MAP_SIZE, NP_PIN("map_nodes"));

// Its own
BPF_HASH(np_frontends, struct np_frontend_key, struct np_frontend, NP_FRONTEND_MAP_SIZE);
BPF_ARRAY(np_config, struct np_config, 1);
BPF_TABLE("lru_hash", struct np_tuple, struct np_ct, np_ct, NP_CT_MAP_SIZE);
BPF_TABLE("lru_hash", struct np_tuple, struct np_rev, np_rev, NP_CT_MAP_SIZE);
BPF_TABLE("lru_hash", struct np_affinity_key, struct np_affinity_val, np_affinity,
          NP_AFFINITY_MAP_SIZE);

struct pkt {
    struct np_tuple t;
    __u32 l4_off;
    __u8 tcp_flags;
    __u8 ihl;  // bytes
};

// splitmix64's finalizer, as sock_lb.c's mix64 (the flow hash spreads over the Maglev row)
static __always_inline __u64 mix64(__u64 x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

// IPv4 TCP/UDP, first fragment or whole: 0; anything else -1 (not ours)
static __always_inline int parse(struct __sk_buff *skb, struct pkt *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return -1;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return -1;
    if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
        return -1;
    if (ip->frag_off & bpf_htons(0x1fff))
        return -1;
    __u32 ihl = (ip->ihl & 0xf) * 4;
    if (ihl < 20)
        return -1;
    __u8 *l4 = (void *)ip + ihl;
    if ((void *)l4 + 8 > data_end)
        return -1;
    p->tcp_flags = 0;
    if (ip->protocol == IPPROTO_TCP) {
        if ((void *)l4 + 14 > data_end)
            return -1;
        p->tcp_flags = l4[13];
    }
    p->t.saddr = ip->saddr;
    p->t.daddr = ip->daddr;
    p->t.proto = ip->protocol;
    p->t.sport = *(__be16 *)l4;
    p->t.dport = *(__be16 *)(l4 + 2);
    p->l4_off = IP_OFF + ihl;
    p->ihl = ihl;
    return 0;
}

// Rewrite one end (source or destination) of the packet, checksums included. The L4 checksum
// goes through BPF_F_PSEUDO_HDR, so a packet with a partial checksum (veth) stays right.
static __always_inline void rewrite(struct __sk_buff *skb, struct pkt *p, int source,
                                    __be32 old_ip, __be32 new_ip, __be16 old_port,
                                    __be16 new_port)
{
    __u32 csum_off = p->l4_off + (p->t.proto == IPPROTO_TCP ? 16 : 6);
    __u64 mangled0 = p->t.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
    __u32 ip_off = IP_OFF + (source ? offsetof(struct iphdr, saddr) : offsetof(struct iphdr, daddr));
    if (old_ip != new_ip) {
        bpf_l4_csum_replace(skb, csum_off, old_ip, new_ip,
                            BPF_F_PSEUDO_HDR | mangled0 | sizeof(new_ip));
        bpf_l3_csum_replace(skb, IP_OFF + offsetof(struct iphdr, check), old_ip, new_ip,
                            sizeof(new_ip));
        bpf_skb_store_bytes(skb, ip_off, &new_ip, sizeof(new_ip), 0);
    }
    if (old_port != new_port) {
        bpf_l4_csum_replace(skb, csum_off, old_port, new_port, mangled0 | sizeof(new_port));
        bpf_skb_store_bytes(skb, p->l4_off + (source ? 0 : 2), &new_port, sizeof(new_port), 0);
    }
}

// Out through the route the FIB gives for the (rewritten) destination: the VXLAN device
// (to_overlay encapsulates) or the underlay towards the backend's node or the client. Not
// through the stack: a SNATed packet carries this node's own address as its source, which the
// stack drops as martian on input.
static __always_inline int forward(struct __sk_buff *skb, __be32 saddr, __be32 daddr)
{
    struct bpf_fib_lookup fib = {};
    fib.family = AF_INET;
    fib.ipv4_src = saddr;
    fib.ipv4_dst = daddr;
    fib.ifindex = skb->ifindex;
    long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
    if (rc == BPF_FIB_LKUP_RET_SUCCESS) {
        if (bpf_skb_store_bytes(skb, 0, fib.dmac, ETH_ALEN, 0) < 0 ||
            bpf_skb_store_bytes(skb, ETH_ALEN, fib.smac, ETH_ALEN, 0) < 0)
            return TC_ACT_SHOT;
        return bpf_redirect(fib.ifindex, 0);
    }
    if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
        return redirect_neigh(fib.ifindex, 0, 0, 0);
    return TC_ACT_SHOT;
}

// -- backend selection (the socket LB's maps) -----------------------------------------------

#define LB_LOOKUP_TRIES 4

// The service's current revision, copied, as sock_lb.c's lb_lookup (the same checks: an
// lb_services element may be reused for another key under a reader): 1 found, 0 not a
// service, -1 none consistent. A copy because bcc rewrites `map.lookup()` only in the file it
// compiles (not in a header or a macro); tests/unit/services/test_lb_lookup_copies.py keeps
// the two the same.
static __always_inline int lb_lookup(struct lb_svc_key *key, struct lb_rev *out, __u32 *rev_out)
{
#pragma unroll
    for (int i = 0; i < LB_LOOKUP_TRIES; i++) {
        struct lb_svc *svc = lb_services.lookup(key);
        if (!svc)
            return 0;
        __u32 rev = *(volatile __u32 *)&svc->rev;
        struct lb_rev *r = lb_revs.lookup(&rev);
        if (r && r->svc.vip == key->vip && r->svc.port == key->port &&
            r->svc.proto == key->proto) {
            __builtin_memcpy(out, r, sizeof(*out));
            *rev_out = rev;
            return 1;
        }
    }
    return -1;
}

static __always_inline __u32 pick(struct lb_rev *svc, __u32 rev, struct np_tuple *t)
{
    if (svc->count == 0)
        return 0;
    // The client's address and port only: whichever node a flow enters, it gets one backend.
    __u64 h = mix64(((__u64)t->saddr << 32) | ((__u64)t->sport << 8) | t->proto);
    if (svc->flags & LB_FLAG_MAGLEV) {  // the socket LB's table: M slots in chunks
        __u64 m = svc->maglev_m;
        if (m == 0 || m > MAGLEV_MAX_M)
            return 0;
        __u32 slot = (__u32)(h % m);
        struct lb_maglev_key mkey = {.rev = rev, .chunk = slot >> MAGLEV_CHUNK_SHIFT};
        struct lb_maglev_chunk *chunk = lb_maglev.lookup(&mkey);
        if (!chunk)
            return 0;
        return chunk->ids[slot & (MAGLEV_CHUNK - 1)];
    }
    struct lb_slot_key key = {.rev = rev, .slot = bpf_get_prandom_u32() % svc->count + 1};
    __u32 *found = lb_slots.lookup(&key);
    return found ? *found : 0;
}

static __always_inline __u32 select_backend(struct lb_rev *svc, __u32 rev, struct np_tuple *t,
                                            __u64 now)
{
    struct np_affinity_key akey = {.client_ip = t->saddr, .svc_id = svc->svc_id};
    if (svc->flags & LB_FLAG_AFFINITY) {
        struct np_affinity_val *aff = np_affinity.lookup(&akey);
        if (aff && now - aff->last_ns < (__u64)svc->affinity_timeout_s * NSEC) {
            __u32 pinned = aff->backend_id;
            if (lb_backends.lookup(&pinned)) {
                aff->last_ns = now;
                return pinned;
            }
        }
    }
    __u32 id = pick(svc, rev, t);
    if (id && (svc->flags & LB_FLAG_AFFINITY)) {
        struct np_affinity_val val = {.backend_id = id, .last_ns = now};
        np_affinity.update(&akey, &val);
    }
    return id;
}

// -- DSR: the option ------------------------------------------------------------------------

// Grow the IPv4 header by the option carrying the frontend (the packet's first 20 bytes of IP
// header must be all it has: a client's packet with options of its own keeps them, no DSR).
static __always_inline int add_dsr_option(struct __sk_buff *skb, __be32 front_ip,
                                          __be16 front_port)
{
    if (bpf_skb_adjust_room(skb, DSR_OPT_LEN, BPF_ADJ_ROOM_NET, 0) < 0)
        return -1;
    __u8 hdr[28];
    if (bpf_skb_load_bytes(skb, IP_OFF, hdr, 20) < 0)
        return -1;
    hdr[0] = 0x47;  // version 4, 7 words
    __u16 tot = ((__u16)hdr[2] << 8 | hdr[3]) + DSR_OPT_LEN;
    hdr[2] = tot >> 8;
    hdr[3] = tot & 0xff;
    hdr[10] = 0;
    hdr[11] = 0;
    hdr[20] = DSR_OPT_TYPE;
    hdr[21] = DSR_OPT_LEN;
    __builtin_memcpy(&hdr[22], &front_port, 2);
    __builtin_memcpy(&hdr[24], &front_ip, 4);
    __s64 sum = bpf_csum_diff(0, 0, (__be32 *)hdr, sizeof(hdr), 0);
    if (sum < 0)
        return -1;
    __u32 c = (__u32)sum;
    c = (c & 0xffff) + (c >> 16);
    c = (c & 0xffff) + (c >> 16);
    __u16 check = ~c;
    __builtin_memcpy(&hdr[10], &check, 2);
    return bpf_skb_store_bytes(skb, IP_OFF, hdr, sizeof(hdr), 0);
}

// The backend's node: a packet to a local endpoint carrying the option. Its answers will leave
// with the frontend as their source (np_to_netdev). `ip` is the offset of the IPv4 header.
static __always_inline void learn_dsr(struct __sk_buff *skb, __u32 ip)
{
    __u8 hdr[32];  // IPv4 header with one option (28) + the L4 ports (4)
    if (bpf_skb_load_bytes(skb, ip, hdr, sizeof(hdr)) < 0)
        return;
    if (hdr[0] != 0x47 || hdr[20] != DSR_OPT_TYPE || hdr[21] != DSR_OPT_LEN)
        return;
    if (hdr[9] != IPPROTO_TCP && hdr[9] != IPPROTO_UDP)
        return;
    struct np_tuple key = {.proto = hdr[9]};
    struct np_rev rev = {.flags = NP_REV_SRC};
    __builtin_memcpy(&key.daddr, &hdr[12], 4);  // the answer goes to the client...
    __builtin_memcpy(&key.saddr, &hdr[16], 4);  // ...from the backend
    __builtin_memcpy(&key.dport, &hdr[28], 2);
    __builtin_memcpy(&key.sport, &hdr[30], 2);
    __builtin_memcpy(&rev.front_port, &hdr[22], 2);
    __builtin_memcpy(&rev.front_ip, &hdr[24], 4);
    __be32 backend = key.saddr;
    if (!ep_by_ip.lookup(&backend))
        return;
    rev.client_ip = key.daddr;
    rev.client_port = key.dport;
    np_rev.update(&key, &rev);
}

// A DSR packet inside VXLAN (tunnel routing): only from a known node.
static __always_inline void learn_dsr_vxlan(struct __sk_buff *skb, struct pkt *p)
{
    if (p->t.proto != IPPROTO_UDP || p->t.dport != bpf_htons(VXLAN_PORT))
        return;
    __be32 outer = p->t.saddr;
    if (!nodes.lookup(&outer))
        return;
    learn_dsr(skb, p->l4_off + 8 /* UDP */ + 8 /* VXLAN */ + ETH_HLEN);
}

// -- the programs ---------------------------------------------------------------------------

static __always_inline int to_backend(struct __sk_buff *skb, struct pkt *p, struct np_config *cfg,
                                      struct np_frontend *fe)
{
    struct np_tuple t = p->t;
    __u64 now = bpf_ktime_get_ns();
    struct np_ct *ct = np_ct.lookup(&t);
    struct np_ct fresh = {};  // the flow's entry, copied (or new)
    int tracked = 0;
    int opening = t.proto == IPPROTO_UDP ||
                  (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
    if (ct) {
        __u8 gone = ct->flags & NP_CT_GONE;
        if (!opening && gone) {
            // An established TCP flow whose backend was deleted (the agent marked it): it
            // would be blackholed. To the node port, the packet goes on to this node's own
            // stack untranslated: nothing listens there, so TCP answers it with a reset from
            // the node port (sequence number = the segment's ACK: the client's socket takes
            // it). A VIP from outside cannot be answered so (not this node's address): dropped.
            return t.daddr == cfg->node_ip ? TC_ACT_UNSPEC : TC_ACT_SHOT;
        }
        tracked = 1;
        if (opening) {
            // A backend that left the service (deleted or terminating) gets no new connection
            // and no more datagrams, even on a tracked tuple: pick again. An established TCP
            // flow keeps its backend, so a terminating backend finishes it (graceful).
            __u32 bid = ct->backend_id;
            struct lb_backend *still = lb_backends.lookup(&bid);
            if (gone || !still || still->ip != ct->backend_ip || still->port != ct->backend_port)
                tracked = 0;
        }
        if (tracked) {
            // Closing (FIN or RST from the client): the agent's GC removes the entry once
            // idle for a while; a SYN on the same tuple opens it again.
            if (p->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
                ct->flags |= NP_CT_CLOSING;
            else if (opening && (ct->flags & NP_CT_CLOSING))
                ct->flags &= ~NP_CT_CLOSING;
            ct->last_ns = now;
            __builtin_memcpy(&fresh, ct, sizeof(fresh));
        }
    }
    if (!tracked) {
        struct lb_svc_key skey = {.vip = fe->vip, .port = fe->vport, .proto = t.proto};
        struct lb_rev svc;
        __u32 rev = 0;
        if (lb_lookup(&skey, &svc, &rev) <= 0)
            return TC_ACT_SHOT;
        __u32 id = select_backend(&svc, rev, &t, now);
        struct lb_backend *be = id ? lb_backends.lookup(&id) : 0;
        if (!be)
            return TC_ACT_SHOT;  // a service without a usable backend
        __u32 sid = svc.svc_id;  // the socket LB creates the entry with its first connect()
        struct lb_svc_stats *st = lb_svc_stats.lookup(&sid);
        if (!st) {
            struct lb_svc_stats zero = {};
            lb_svc_stats.update(&sid, &zero);  // BPF_ANY: a racing first writer is harmless
            st = lb_svc_stats.lookup(&sid);
        }
        if (st)
            __sync_fetch_and_add(&st->nodeport, 1);
        fresh.backend_ip = be->ip;
        fresh.backend_port = be->port;
        fresh.backend_id = id;
        __be32 bip = be->ip;
        if (ep_by_ip.lookup(&bip)) {
            fresh.flags = NP_CT_LOCAL;
        } else {
            struct ipcache_key ik = {.prefixlen = 32, .addr = bip};
            struct ipcache_value *iv = ipcache.lookup(&ik);
            // DSR needs a node of ours at the far end to answer for the service; the client
            // keeps its own address only if the packet can carry the option (no options yet)
            if ((fe->flags & NP_FRONTEND_DSR) && iv && iv->tunnel_endpoint && p->ihl == 20)
                fresh.flags = NP_CT_DSR;
            else
                fresh.flags = NP_CT_SNAT;
        }
        if (fresh.flags == NP_CT_SNAT) {
            // This node's address and a port no other SNATed flow to that backend uses: the
            // client's own port if free, else random ones.
            struct np_tuple rkey = {.saddr = be->ip, .daddr = cfg->node_ip, .sport = be->port,
                                    .dport = t.sport, .proto = t.proto};
            struct np_rev rev = {.front_ip = t.daddr, .front_port = t.dport,
                                 .client_ip = t.saddr, .client_port = t.sport,
                                 .flags = NP_REV_SNAT};
            int ok = np_rev.insert(&rkey, &rev) == 0;
#pragma unroll
            for (int i = 0; i < NP_SNAT_RETRIES; i++) {
                if (ok)
                    break;
                rkey.dport = bpf_htons(1024 + bpf_get_prandom_u32() % (65536 - 1024));
                ok = np_rev.insert(&rkey, &rev) == 0;
            }
            if (!ok)
                return TC_ACT_SHOT;
            fresh.nat_port = rkey.dport;
        } else if (fresh.flags == NP_CT_LOCAL) {
            struct np_tuple rkey = {.saddr = be->ip, .daddr = t.saddr, .sport = be->port,
                                    .dport = t.sport, .proto = t.proto};
            struct np_rev rev = {.front_ip = t.daddr, .front_port = t.dport,
                                 .client_ip = t.saddr, .client_port = t.sport,
                                 .flags = NP_REV_SRC};
            np_rev.update(&rkey, &rev);
        }
        fresh.last_ns = now;
        np_ct.update(&t, &fresh);
    }
    __be32 bip = fresh.backend_ip;
    __be16 bport = fresh.backend_port;
    __u8 flags = fresh.flags;
    __be16 nat_port = fresh.nat_port;
    rewrite(skb, p, 0, t.daddr, bip, t.dport, bport);
    if (flags & NP_CT_LOCAL)
        return TC_ACT_UNSPEC;  // on to the datapath's program and to_endpoint, as any packet
    if (flags & NP_CT_SNAT) {
        rewrite(skb, p, 1, t.saddr, cfg->node_ip, t.sport, nat_port);
        // tunnel: to_overlay sends this identity (Cilium's: NodePort traffic is world there)
        skb->mark = MARK_FROM_PROXY | IDENTITY_WORLD;
        return forward(skb, cfg->node_ip, bip);
    }
    if (opening && add_dsr_option(skb, t.daddr, t.dport) < 0)
        return TC_ACT_SHOT;
    skb->mark = MARK_FROM_PROXY | IDENTITY_WORLD;  // the client is outside the cluster
    return forward(skb, t.saddr, bip);
}

int np_from_netdev(struct __sk_buff *skb)
{
    struct pkt p = {};
    if (parse(skb, &p) < 0)
        return TC_ACT_UNSPEC;
    __u32 zero = 0;
    struct np_config *cfg = np_config.lookup(&zero);
    if (!cfg || !cfg->node_ip)
        return TC_ACT_UNSPEC;
    // An answer to a SNATed flow (addressed to this node): back to the frontend's address,
    // out to the client
    struct np_rev *rev = p.t.daddr == cfg->node_ip ? np_rev.lookup(&p.t) : 0;
    if (rev && (rev->flags & NP_REV_SNAT)) {
        __be32 front_ip = rev->front_ip, client_ip = rev->client_ip;
        __be16 front_port = rev->front_port, client_port = rev->client_port;
        rewrite(skb, &p, 1, p.t.saddr, front_ip, p.t.sport, front_port);
        rewrite(skb, &p, 0, p.t.daddr, client_ip, p.t.dport, client_port);
        return forward(skb, front_ip, client_ip);
    }
    struct np_frontend_key fkey = {.addr = p.t.daddr == cfg->node_ip ? 0 : p.t.daddr,
                                   .port = p.t.dport, .proto = p.t.proto};
    struct np_frontend *fe = np_frontends.lookup(&fkey);
    if (fe)
        return to_backend(skb, &p, cfg, fe);
    // A connection straight to a local backend's port that reuses the backend-side tuple of an
    // earlier node-port flow (same client address and port): that flow is over (one tuple, one
    // connection), so its reverse entry must not rewrite this connection's replies to the
    // node port's address. Its tracked entry goes too, so that a later node-port connection
    // on the client's tuple starts afresh and writes its reverse entry again.
    if ((p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN) {
        struct np_tuple back = {.saddr = p.t.daddr, .daddr = p.t.saddr, .sport = p.t.dport,
                                .dport = p.t.sport, .proto = p.t.proto};
        struct np_rev *old = np_rev.lookup(&back);
        if (old && (old->flags & NP_REV_SRC)) {
            struct np_tuple front = {.saddr = old->client_ip, .daddr = old->front_ip,
                                     .sport = old->client_port, .dport = old->front_port,
                                     .proto = p.t.proto};
            np_ct.delete(&front);
            np_rev.delete(&back);
        }
    }
    // The backend's node of a DSR flow
    if (p.ihl == 28)
        learn_dsr(skb, IP_OFF);
    else
        learn_dsr_vxlan(skb, &p);
    return TC_ACT_UNSPEC;
}

int np_to_netdev(struct __sk_buff *skb)
{
    struct pkt p = {};
    if (parse(skb, &p) < 0)
        return TC_ACT_OK;
    struct np_rev *rev = np_rev.lookup(&p.t);
    if (rev && (rev->flags & NP_REV_SRC)) {
        __be32 front_ip = rev->front_ip;
        __be16 front_port = rev->front_port;
        rewrite(skb, &p, 1, p.t.saddr, front_ip, p.t.sport, front_port);
    }
    return TC_ACT_OK;
}
