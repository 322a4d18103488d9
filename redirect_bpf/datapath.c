// l7proxy datapath: identity-based L3/L4 policy at the host side of each endpoint veth,
// conntrack, fail-closed redirection to the proxy (bpf_sk_assign), verdict events, and the
// sidecar-mode connect() redirection. Loaded by redirect_bpf/loader.py with bcc.
//
// IPv4 and IPv6 share one handler, handle_family(), instantiated twice with a constant family:
// the policy tries (identity/port/proto keys) and counters are family-free; the ipcache,
// conntrack and endpoint-by-address maps have v6 twins (ipcache6, conntrack6, ep_by_ip6), so
// the IPv4 path keeps its 32-bit keys and its cost.
//
// One file on purpose: bcc rewrites map syntax (map.lookup()) and finds programs only in the
// main source file, so only plain definitions (datapath.h) can live in headers. Sections:
// maps, shared helpers (identity, policy lookup, verdict, events), tc programs, sidecar programs.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>

#include "datapath.h"

BPF_LPM_TRIE(policy_deny, struct policy_key, struct policy_value, POLICY_MAP_SIZE);
BPF_LPM_TRIE(policy_allow, struct policy_key, struct policy_value, POLICY_MAP_SIZE);
BPF_LPM_TRIE(ipcache, struct ipcache_key, struct ipcache_value, IPCACHE_SIZE);
BPF_TABLE("lru_hash", struct ct_key, struct ct_entry, conntrack, CT_MAP_SIZE);
BPF_HASH(ep_by_ifindex, __u32, struct endpoint_info, ENDPOINT_MAP_SIZE);
BPF_HASH(ep_by_ip, __be32, struct endpoint_info, ENDPOINT_MAP_SIZE);
BPF_HASH(ep_by_cgroup, __u64, struct endpoint_info, ENDPOINT_MAP_SIZE);
BPF_ARRAY(config, struct dp_config, 1);
BPF_PERCPU_ARRAY(counters, struct counter, 2 * 3 * REASONS);
BPF_RINGBUF_OUTPUT(events, EVENT_RING_SIZE / 4096);
BPF_TABLE("lru_hash", __u64, struct sidecar_orig, sidecar_by_cookie, SIDECAR_MAP_SIZE);
BPF_TABLE("lru_hash", struct sidecar_addr, struct sidecar_orig, sidecar_by_addr, SIDECAR_MAP_SIZE);
BPF_HASH(nodes, __be32, struct node_info, NODE_MAP_SIZE);
BPF_LPM_TRIE(ipcache6, struct ipcache6_key, struct ipcache_value, IPCACHE_SIZE);
BPF_TABLE("lru_hash", struct ct6_key, struct ct_entry, conntrack6, CT6_MAP_SIZE);
BPF_HASH(ep_by_ip6, struct ip6_key, struct endpoint_info, ENDPOINT_MAP_SIZE);

#define NSEC 1000000000ULL
#define PARSE_IPV6 1
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10
#define IPPROTO_ICMP6 58
#define ICMP6_ECHO_REQUEST 128
#define ICMP6_ECHO_REPLY 129
// Link-local control that always passes (like ARP): multicast listener discovery (130-132,
// MLDv2 report 143; a namespace sends it as soon as its interface is up) and neighbour
// discovery (133-137: router solicitation .. redirect, RFC 4861).
#define ICMP6_LINK_FIRST 130
#define ICMP6_LINK_LAST 137
#define ICMP6_MLD2_REPORT 143
#define IPV6_EXT_HEADERS 4  // extension headers skipped before the L4 header, at most

// saddr/daddr for IPv4, saddr6/daddr6 for IPv6 (the other pair is unused, never read).
struct tuple {
    __be32 saddr;
    __be32 daddr;
    __be16 sport;
    __be16 dport;
    __u8 proto;
    __u8 tcp_flags;
    __be32 saddr6[4];
    __be32 daddr6[4];
};

struct verdict {
    struct policy_value value;
    __u32 match_identity;
    __u8 match;
    __u8 found;
};

static __always_inline void count(__u8 direction, __u8 verdict, __u8 reason, __u32 len)
{
    int slot = (direction * 3 + verdict) * REASONS + reason;
    struct counter *c = counters.lookup(&slot);
    if (c) {
        c->packets += 1;
        c->bytes += len;
    }
}

static __always_inline __u32 identity_of(__be32 addr)
{
    struct ipcache_key key = {.prefixlen = 32, .addr = addr};
    struct ipcache_value *v = ipcache.lookup(&key);
    return v ? v->identity : IDENTITY_WORLD;
}

static __always_inline __u32 identity_of6(__be32 *addr)
{
    struct ipcache6_key key = {.prefixlen = 128};
    __builtin_memcpy(key.addr, addr, 16);
    struct ipcache_value *v = ipcache6.lookup(&key);
    return v ? v->identity : IDENTITY_WORLD_IPV6;
}

// The L4 part of a tuple, TCP/UDP/ICMP(v6), from the header at l4. Returns -1 if truncated.
static __always_inline int parse_l4(void *data_end, __u8 *l4, struct tuple *t)
{
    if (t->proto == IPPROTO_TCP) {
        if ((void *)l4 + 14 > data_end)
            return -1;
        struct tcphdr *tcp = (void *)l4;
        t->sport = tcp->source;
        t->dport = tcp->dest;
        t->tcp_flags = l4[13];
    } else if (t->proto == IPPROTO_UDP) {
        struct udphdr *udp = (void *)l4;
        if ((void *)(udp + 1) > data_end)
            return -1;
        t->sport = udp->source;
        t->dport = udp->dest;
    } else if (t->proto == IPPROTO_ICMP6) {
        if ((void *)l4 + 8 > data_end)
            return -1;
        // As for ICMPv4: policy port = type (a reply looks up its request), the echo id keeps
        // flows apart.
        t->dport = bpf_htons(l4[0] == ICMP6_ECHO_REPLY ? ICMP6_ECHO_REQUEST : l4[0]);
        t->sport = *(__be16 *)(l4 + 4);
    }
    return 0;
}

// IPv6: addresses, then up to IPV6_EXT_HEADERS extension headers (hop-by-hop, routing,
// destination options, fragment) to the L4 header. A non-first fragment has no ports.
static __always_inline int parse6(void *data_end, __u8 *ip6, struct tuple *t)
{
    if ((void *)ip6 + 40 > data_end)
        return -1;
    __builtin_memcpy(t->saddr6, ip6 + 8, 16);
    __builtin_memcpy(t->daddr6, ip6 + 24, 16);
    t->saddr = 0;
    t->daddr = 0;
    t->sport = 0;
    t->dport = 0;
    t->tcp_flags = 0;
    __u8 nexthdr = ip6[6];
    __u8 *l4 = ip6 + 40;
#pragma unroll
    for (int i = 0; i < IPV6_EXT_HEADERS; i++) {
        if (nexthdr == 0 || nexthdr == 43 || nexthdr == 60) {
            if ((void *)l4 + 8 > data_end)
                return -1;
            nexthdr = l4[0];
            l4 += ((__u32)l4[1] + 1) * 8;
        } else if (nexthdr == 44) {
            if ((void *)l4 + 8 > data_end)
                return -1;
            nexthdr = l4[0];
            __u16 offset = (((__u16)l4[2] << 8) | l4[3]) & 0xfff8;
            l4 += 8;
            if (offset) {
                t->proto = nexthdr;
                return PARSE_IPV6;
            }
        }
    }
    t->proto = nexthdr;
    if (parse_l4(data_end, l4, t) < 0)
        return -1;
    return PARSE_IPV6;
}

static __always_inline int parse(struct __sk_buff *skb, struct tuple *t)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return -1;
    if (eth->h_proto == bpf_htons(ETH_P_IPV6))
        return parse6(data_end, (void *)(eth + 1), t);
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return -1;  // ARP and friends
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return -1;
    t->saddr = ip->saddr;
    t->daddr = ip->daddr;
    t->proto = ip->protocol;
    t->sport = 0;
    t->dport = 0;
    t->tcp_flags = 0;
    if (ip->frag_off & bpf_htons(0x1fff))
        return 0;  // non-first fragment: no ports
    __u32 ihl = (ip->ihl & 0xf) * 4;
    void *l4 = (void *)ip + ihl;
    if (ip->protocol == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)tcp + 14 > data_end)
            return -1;
        t->sport = tcp->source;
        t->dport = tcp->dest;
        t->tcp_flags = ((__u8 *)tcp)[13];
    } else if (ip->protocol == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > data_end)
            return -1;
        t->sport = udp->source;
        t->dport = udp->dest;
    } else if (ip->protocol == IPPROTO_ICMP) {
        __u8 *icmp = l4;
        if ((void *)icmp + 8 > data_end)
            return -1;
        // Policy port = ICMP type; the echo id keeps flows apart.
        t->dport = bpf_htons(icmp[0] == 0 ? 8 : icmp[0]);
        t->sport = *(__be16 *)(icmp + 4);
    }
    return 0;
}

// Cilium's precedence, one lookup after another: any deny (identity-specific, then L4-only)
// wins; then an identity-specific allow beats an L4-only one; within one trie the longest
// port prefix wins.
static __always_inline void policy_lookup(__u32 endpoint_id, __u32 identity, __u8 direction,
                                          __u8 proto, __be16 dport, struct verdict *out)
{
    struct policy_key key = {
        .prefixlen = 96,
        .endpoint_id = endpoint_id,
        .identity = identity,
        .direction = direction,
        .proto = proto,
        .dport = dport,
    };
    struct policy_value *v = policy_deny.lookup(&key);
    out->match = MATCH_L3;
    out->match_identity = identity;
    if (!v) {
        key.identity = IDENTITY_ANY;
        v = policy_deny.lookup(&key);
        out->match = MATCH_L4;
        out->match_identity = IDENTITY_ANY;
    }
    if (!v) {
        key.identity = identity;
        v = policy_allow.lookup(&key);
        out->match = MATCH_L3;
        out->match_identity = identity;
    }
    if (!v) {
        key.identity = IDENTITY_ANY;
        v = policy_allow.lookup(&key);
        out->match = MATCH_L4;
        out->match_identity = IDENTITY_ANY;
    }
    if (v) {
        out->value = *v;
        out->found = 1;
    } else {
        out->match = MATCH_NONE;
        out->match_identity = 0;
        out->found = 0;
    }
}

// Verdict for a new flow: VERDICT_* and the reason.
static __always_inline __u8 decide(struct endpoint_info *ep, __u8 direction, struct verdict *v,
                                   __u8 *reason)
{
    __u8 enforced = direction == DIR_INGRESS ? (ep->flags & EP_INGRESS_ENFORCED)
                                             : (ep->flags & EP_EGRESS_ENFORCED);
    if (!v->found) {
        *reason = enforced ? REASON_POLICY_DENIED : REASON_NEW_FLOW;
        return enforced ? VERDICT_DROPPED : VERDICT_FORWARDED;
    }
    if (v->value.deny) {
        *reason = REASON_POLICY_DENY;
        return VERDICT_DROPPED;
    }
    *reason = REASON_NEW_FLOW;
    return v->value.redirect ? VERDICT_REDIRECTED : VERDICT_FORWARDED;
}

static __always_inline void fill_event(struct flow_event *e, struct tuple *t, __u32 src_id,
                                       __u32 dst_id, __u32 ep_id, __u8 direction, __u8 verdict,
                                       __u8 reason, struct verdict *v)
{
    e->ts_ns = bpf_ktime_get_ns();
    e->src_identity = src_id;
    e->dst_identity = dst_id;
    e->saddr = t->saddr;
    e->daddr = t->daddr;
    e->sport = t->sport;
    e->dport = t->dport;
    e->endpoint_id = ep_id;
    e->proto = t->proto;
    e->direction = direction;
    e->verdict = verdict;
    e->reason = reason;
    e->proxy_port = 0;
    e->match = MATCH_NONE;
    e->match_prefix_len = 0;
    e->match_identity = 0;
    e->match_proto = 0;
    e->match_deny = 0;
    e->match_port = 0;
    if (v && v->found) {
        __u8 plen = v->value.key_prefix_len;
        __u16 port = bpf_ntohs(t->dport);
        e->proxy_port = v->value.proxy_port;
        e->match = v->match;
        e->match_identity = v->match_identity;
        e->match_proto = v->value.key_proto;
        e->match_deny = v->value.deny;
        e->match_prefix_len = plen;
        e->match_port = plen >= 16 ? port : (plen == 0 ? 0 : port & (0xffff << (16 - plen)));
    }
}

// One verdict event: struct flow_event for IPv4, struct flow_event6 (its addresses after it)
// for IPv6.
static __always_inline void emit_family(struct tuple *t, __u32 src_id, __u32 dst_id,
                                        __u32 ep_id, __u8 direction, __u8 verdict, __u8 reason,
                                        struct verdict *v, const int v6)
{
    if (v6) {
        struct flow_event6 *e6 = events.ringbuf_reserve(sizeof(struct flow_event6));
        if (!e6)
            return;
        fill_event(&e6->base, t, src_id, dst_id, ep_id, direction, verdict, reason, v);
        __builtin_memcpy(e6->saddr6, t->saddr6, 16);
        __builtin_memcpy(e6->daddr6, t->daddr6, 16);
        events.ringbuf_submit(e6, 0);
        return;
    }
    struct flow_event *e = events.ringbuf_reserve(sizeof(struct flow_event));
    if (!e)
        return;
    fill_event(e, t, src_id, dst_id, ep_id, direction, verdict, reason, v);
    events.ringbuf_submit(e, 0);
}

static __always_inline void emit(struct tuple *t, __u32 src_id, __u32 dst_id, __u32 ep_id,
                                 __u8 direction, __u8 verdict, __u8 reason, struct verdict *v)
{
    emit_family(t, src_id, dst_id, ep_id, direction, verdict, reason, v, 0);
}

// The proxy's own address in a socket lookup: 127.0.0.1:port, or [::1]:port for IPv6.
// A TCP packet that opens a connection: SYN without ACK.
static __always_inline int tcp_opens(struct tuple *t)
{
    return t->proto == IPPROTO_TCP &&
           (t->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
}

static __always_inline void proxy_dst(struct bpf_sock_tuple *st, __u16 proxy_port, const int v6)
{
    if (v6) {
        st->ipv6.daddr[0] = 0;
        st->ipv6.daddr[1] = 0;
        st->ipv6.daddr[2] = 0;
        st->ipv6.daddr[3] = bpf_htonl(1);
        st->ipv6.dport = bpf_htons(proxy_port);
    } else {
        st->ipv4.daddr = bpf_htonl(0x7f000001);
        st->ipv4.dport = bpf_htons(proxy_port);
    }
}

// The packet's own 4-tuple in a socket lookup.
static __always_inline void packet_tuple(struct bpf_sock_tuple *st, const struct tuple *t,
                                         const int v6)
{
    if (v6) {
        __builtin_memcpy(st->ipv6.saddr, t->saddr6, 16);
        __builtin_memcpy(st->ipv6.daddr, t->daddr6, 16);
        st->ipv6.sport = t->sport;
        st->ipv6.dport = t->dport;
    } else {
        st->ipv4.saddr = t->saddr;
        st->ipv4.daddr = t->daddr;
        st->ipv4.sport = t->sport;
        st->ipv4.dport = t->dport;
    }
}

// Hand the packet to the proxy's transparent socket in this (host) namespace: an existing
// accepted connection by the original tuple, else the listener on 127.0.0.1:proxy_port, or on
// [::1]:proxy_port for IPv6 (UDP: the DNS proxy's socket there).
// Fails (returns -1) when no proxy socket exists; the caller then drops ("no proxy").
static __always_inline int assign_to_proxy_family(struct __sk_buff *skb, struct tuple *t,
                                                  __u16 proxy_port, const int v6)
{
    struct bpf_sock_tuple st = {};
    struct bpf_sock *sk;
    long ret;
    __u32 st_size = v6 ? sizeof(st.ipv6) : sizeof(st.ipv4);

    if (proxy_port == 0)
        return -1;
    if (t->proto == IPPROTO_UDP) {
        // DNS: every datagram goes to the proxy's one UDP socket on 127.0.0.1:proxy_port, which
        // reads the original destination with IP_RECVORIGDSTADDR.
        proxy_dst(&st, proxy_port, v6);
        sk = bpf_sk_lookup_udp(skb, &st, st_size, BPF_F_CURRENT_NETNS, 0);
        if (!sk)
            return -1;
        goto assign;
    }
    if (t->proto != IPPROTO_TCP)
        return -1;
    packet_tuple(&st, t, v6);
    // A bare SYN opens a new connection: go to the listener (skip TIME_WAIT leftovers).
    if (!tcp_opens(t)) {
        sk = bpf_skc_lookup_tcp(skb, &st, st_size, BPF_F_CURRENT_NETNS, 0);
        if (sk) {
            if (sk->state != BPF_TCP_LISTEN)
                goto assign;
            bpf_sk_release(sk);
        }
    }
    proxy_dst(&st, proxy_port, v6);
    sk = bpf_skc_lookup_tcp(skb, &st, st_size, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return -1;
    if (sk->state != BPF_TCP_LISTEN) {
        bpf_sk_release(sk);
        return -1;
    }
assign:
    ret = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (ret != 0)
        return -1;
    skb->mark = MARK_TO_PROXY;  // ip rule: local delivery for the assigned socket
    return 0;
}

static __always_inline int assign_to_proxy(struct __sk_buff *skb, struct tuple *t,
                                           __u16 proxy_port)
{
    return assign_to_proxy_family(skb, t, proxy_port, 0);
}

// The conntrack key of a packet: its two (address, port) ends in a fixed order, so a flow and
// its replies share one entry, and the endpoint device, so each endpoint tracks its own view.
static __always_inline void ct_key_of(struct tuple *t, __u32 ifindex, struct ct_key *key)
{
    __be16 sport = t->sport, dport = t->dport;
    if (t->proto == IPPROTO_ICMP)
        dport = sport;  // the echo id on both ends (dport carries the ICMP type for policy)
    if (t->saddr < t->daddr || (t->saddr == t->daddr && sport <= dport)) {
        key->addr_lo = t->saddr;
        key->addr_hi = t->daddr;
        key->port_lo = sport;
        key->port_hi = dport;
    } else {
        key->addr_lo = t->daddr;
        key->addr_hi = t->saddr;
        key->port_lo = dport;
        key->port_hi = sport;
    }
    key->proto = t->proto;
    key->ifindex = ifindex;
}

// ct_key_of for IPv6 (conntrack6): the same order, on 128-bit addresses compared word by word
// (any fixed order works, as long as both directions of a flow compute the same one).
static __always_inline void ct6_key_of(struct tuple *t, __u32 ifindex, struct ct6_key *key)
{
    __be16 sport = t->sport, dport = t->dport;
    if (t->proto == IPPROTO_ICMP6)
        dport = sport;
    int order = 0;  // <0: saddr first, >0: daddr first
#pragma unroll
    for (int i = 0; i < 4; i++) {
        if (order == 0 && t->saddr6[i] != t->daddr6[i])
            order = t->saddr6[i] < t->daddr6[i] ? -1 : 1;
    }
    if (order < 0 || (order == 0 && sport <= dport)) {
        __builtin_memcpy(key->addr_lo, t->saddr6, 16);
        __builtin_memcpy(key->addr_hi, t->daddr6, 16);
        key->port_lo = sport;
        key->port_hi = dport;
    } else {
        __builtin_memcpy(key->addr_lo, t->daddr6, 16);
        __builtin_memcpy(key->addr_hi, t->saddr6, 16);
        key->port_lo = dport;
        key->port_hi = sport;
    }
    key->proto = t->proto;
    key->ifindex = ifindex;
}

// Conntrack access by family: conntrack with the v4 key, conntrack6 with the v6 one.
static __always_inline struct ct_entry *ct_find(struct ct_key *k4, struct ct6_key *k6,
                                                const int v6)
{
    if (v6)
        return conntrack6.lookup(k6);
    return conntrack.lookup(k4);
}

static __always_inline void ct_forget(struct ct_key *k4, struct ct6_key *k6, const int v6)
{
    if (v6)
        conntrack6.delete(k6);
    else
        conntrack.delete(k4);
}

static __always_inline void ct_store(struct ct_key *k4, struct ct6_key *k6, struct ct_entry *e,
                                     const int v6)
{
    if (v6)
        conntrack6.update(k6, e);
    else
        conntrack.update(k4, e);
}

static __always_inline __u64 ct_lifetime(struct dp_config *cfg, struct tuple *t, __u8 flags)
{
    if (t->proto == IPPROTO_TCP) {
        if (flags & CT_CLOSING)
            return cfg->ct_tcp_close_s * NSEC;
        if (flags & CT_SEEN_REPLY)
            return cfg->ct_tcp_established_s * NSEC;
        return cfg->ct_tcp_syn_s * NSEC;
    }
    if (t->proto == IPPROTO_UDP)
        return cfg->ct_udp_s * NSEC;
    return cfg->ct_other_s * NSEC;
}

// Jiffies that may pass before a tracked packet writes its entry's lifetime again: 64 ticks is
// 64 ms at HZ=1000, 256 ms at HZ=250, 0.64 s at HZ=100: expires_ns is never a second stale.
#define CT_REFRESH_TICKS 64

// A tracked packet: flags and lifetime. The common case (nothing new, refreshed within
// CT_REFRESH_TICKS) reads jiffies, which the verifier inlines to one load, and writes nothing:
// no clock helper per packet (76 against 94 ns per tracked packet in BPF_PROG_TEST_RUN), and
// the entry's cache line stays shared by the CPUs of the flow's two directions.
static __always_inline void ct_touch(struct ct_entry *ct, struct dp_config *cfg, struct tuple *t,
                                     __u8 reply)
{
    __u8 flags = ct->flags;
    if (reply)
        flags |= CT_SEEN_REPLY;
    if (t->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
        flags |= CT_CLOSING;
    else if ((t->tcp_flags & TCP_FLAG_SYN) && !reply && (flags & CT_CLOSING))
        flags &= ~CT_CLOSING;  // tuple reused by a new connection
    __u8 tcp_flags = ct->tcp_flags | t->tcp_flags;
    __u32 now = (__u32)bpf_jiffies64();
    if (flags == ct->flags && tcp_flags == ct->tcp_flags && now - ct->refreshed < CT_REFRESH_TICKS)
        return;
    if (flags != ct->flags)
        ct->flags = flags;
    if (tcp_flags != ct->tcp_flags)
        ct->tcp_flags = tcp_flags;
    ct->refreshed = now;
    // The coarse clock (tick resolution) is all a timeout needs.
    ct->expires_ns = bpf_ktime_get_coarse_ns() + ct_lifetime(cfg, t, flags);
}

// The endpoint of this node a packet is addressed to, if any.
static __always_inline struct endpoint_info *local_endpoint(struct tuple *t, const int v6)
{
    if (v6) {
        struct ip6_key daddr6;
        __builtin_memcpy(daddr6.addr, t->daddr6, 16);
        return ep_by_ip6.lookup(&daddr6);
    }
    __be32 daddr = t->daddr;
    return ep_by_ip.lookup(&daddr);
}

// Ingress policy of a local destination endpoint (dst, from local_endpoint), checked at the
// source's from-endpoint so an ingress L7 redirect can still use bpf_sk_assign (only possible
// at tc ingress).
static __always_inline int local_ingress_redirect(struct tuple *t, struct endpoint_info *dst,
                                                  __u32 src_id, struct verdict *v,
                                                  __u32 *dst_ep_id)
{
    if (!dst)
        return 0;
    struct verdict in = {};
    policy_lookup(dst->endpoint_id, src_id, DIR_INGRESS, t->proto, t->dport, &in);
    if (in.found && !in.value.deny && in.value.redirect) {
        *v = in;
        *dst_ep_id = dst->endpoint_id;
        return 1;
    }
    return 0;
}

// The peer's identity: the ipcache entry of the source (ingress) or destination (egress).
static __always_inline __u32 peer_identity(struct tuple *t, __u8 dir, const int v6)
{
    if (v6)
        return identity_of6(dir == DIR_INGRESS ? t->saddr6 : t->daddr6);
    return identity_of(dir == DIR_INGRESS ? t->saddr : t->daddr);
}

// Where a packet leaving an endpoint goes when the program delivers it: the host-side veth of
// the local endpoint it is addressed to; 0 (the stack) for anything else.
static __always_inline __u32 delivery_ifindex(struct endpoint_info *dst)
{
    return dst && !dst->sidecar_port ? dst->ifindex : 0;
}

// Where a tracked packet leaving its endpoint goes with host routing on: the veth of the local
// endpoint it is addressed to (0: the stack). It is remembered in the flow's entry and looked up
// again only when a local endpoint changed since (config.ep_gen): a lookup in ep_by_ip cost
// ~55 ns per packet in an iperf3 stream, the entry's line is already in cache.
static __always_inline __u32 tracked_delivery(struct dp_config *cfg, struct ct_entry *ct,
                                              struct tuple *t, const int v6)
{
    if (!(cfg->flags & CFG_HOST_ROUTING) || (ct->flags & CT_REDIRECTED))
        return 0;
    __u32 gen = cfg->ep_gen;
    if (ct->deliver_gen != gen) {
        ct->deliver_ifindex = delivery_ifindex(local_endpoint(t, v6));
        ct->deliver_gen = gen;
    }
    return ct->deliver_ifindex;
}

// The packet's Ethernet header, or NULL if it is shorter than one.
static __always_inline struct ethhdr *eth_header(struct __sk_buff *skb)
{
    struct ethhdr *eth = (void *)(long)skb->data;
    if ((void *)(eth + 1) > (void *)(long)skb->data_end)
        return 0;
    return eth;
}

// The entry knows its endpoint's MACs, learned since the last endpoint change.
static __always_inline int ct_macs_known(struct ct_entry *ct, struct dp_config *cfg)
{
    return (ct->flags & CT_MACS) && ct->mac_gen == cfg->ep_gen;
}

// An entry's endpoint MACs, as its own packets show them at its veth: leaving it (from_endpoint)
// the source is the pod and the destination the veth's host side; entering it (to_endpoint, on
// the veth's egress, after the stack's neighbour lookup) the other way round. Written once per
// entry and endpoint generation; a packet another program hands into the pod carries them.
static __always_inline void ct_learn_macs(struct __sk_buff *skb, struct ct_entry *ct,
                                          struct dp_config *cfg, __u8 dir)
{
    if (ct_macs_known(ct, cfg))
        return;
    struct ethhdr *eth = eth_header(skb);
    if (!eth)
        return;
    if (dir == DIR_EGRESS) {
        __builtin_memcpy(ct->pod_mac, eth->h_source, ETH_ALEN);
        __builtin_memcpy(ct->host_mac, eth->h_dest, ETH_ALEN);
    } else {
        __builtin_memcpy(ct->pod_mac, eth->h_dest, ETH_ALEN);
        __builtin_memcpy(ct->host_mac, eth->h_source, ETH_ALEN);
    }
    ct->mac_gen = cfg->ep_gen;
    ct->flags |= CT_MACS;
}

// Address a packet as the destination endpoint's veth would: to the pod's MAC from its host
// side's. 1 when written.
static __always_inline __u32 ct_write_macs(struct __sk_buff *skb, struct ct_entry *ct)
{
    struct ethhdr *eth = eth_header(skb);
    if (!eth)
        return 0;
    __builtin_memcpy(eth->h_dest, ct->pod_mac, ETH_ALEN);
    __builtin_memcpy(eth->h_source, ct->host_mac, ETH_ALEN);
    return 1;
}

// A tracked packet passes (a reply, or its flow's own direction): on the endpoint's behalf it is
// addressed to the pod (*deliver: ready to hand over); at the endpoint's veth its entry learns
// the MACs, and one leaving the endpoint gets its delivery (*deliver: the destination's veth).
static __always_inline int tracked_pass(struct __sk_buff *skb, struct dp_config *cfg,
                                        struct ct_entry *ct, struct tuple *t, __u8 dir,
                                        const int v6, __u32 *deliver, const int on_behalf)
{
    if (on_behalf) {
        *deliver = ct_write_macs(skb, ct);
        return TC_ACT_OK;
    }
    ct_learn_macs(skb, ct, cfg, dir);
    if (dir == DIR_EGRESS)
        *deliver = tracked_delivery(cfg, ct, t, v6);
    return TC_ACT_OK;
}

// One parsed packet of family v6 (a constant: each family gets its own inlined copy) at the
// endpoint whose host-side veth is ifindex, in direction dir. A packet leaving it (DIR_EGRESS)
// that host routing hands to a local endpoint sets *deliver to that endpoint's veth. DIR_INGRESS
// with on_behalf (away from the endpoint's veth, with host routing: hand_over) judges on the
// endpoint's behalf: only a packet of a flow it tracks, not the proxy's, whose MACs its entry
// knows; then *deliver is set and the packet is addressed to the pod. Anything else returns
// TC_ACT_OK untouched, for the stack and to_endpoint. known: the flow's entry when the caller
// has already looked it up (NULL: look it up here).
static __always_inline int handle_family(struct __sk_buff *skb, __u8 dir, struct tuple *t,
                                         const int v6, __u32 ifindex, __u32 *deliver,
                                         const int on_behalf, struct ct_entry *known)
{
    struct endpoint_info *ep;
    struct verdict v = {};
    __u8 verdict, reason;
    __u32 zero = 0;
    __u32 len = skb->len;

    // Neighbour and multicast listener discovery are how IPv6 finds its next hop and its
    // groups: never policy's business (and no event, as for ARP).
    if (v6 && t->proto == IPPROTO_ICMP6) {
        __u16 type = bpf_ntohs(t->dport);
        if ((type >= ICMP6_LINK_FIRST && type <= ICMP6_LINK_LAST) || type == ICMP6_MLD2_REPORT)
            return TC_ACT_OK;
    }
    struct dp_config *cfg = config.lookup(&zero);
    if (!cfg)
        return TC_ACT_SHOT;

    __u32 mark_identity = 0;
    __u8 from_proxy = 0, marked = 0;
    if (dir == DIR_INGRESS && (skb->mark & MARK_MAGIC_MASK) == MARK_FROM_PROXY) {
        from_proxy = 1;
        marked = 1;
        mark_identity = skb->mark & MARK_IDENTITY_MASK;
    } else if (dir == DIR_INGRESS && (skb->mark & MARK_MAGIC_MASK) == MARK_FROM_OVERLAY) {
        marked = 1;  // the source identity came in the VNI from a known node (from_overlay)
        mark_identity = skb->mark & MARK_IDENTITY_MASK;
    }

    // One lookup finds the flow in both directions: the key is the tuple in a fixed order plus
    // the endpoint's device, so both hooks of one endpoint share the entry.
    struct ct_key key = {};
    struct ct6_key key6 = {};
    if (v6)
        ct6_key_of(t, ifindex, &key6);
    else
        ct_key_of(t, ifindex, &key);
    struct ct_entry *ct = known ? known : ct_find(&key, &key6, v6);
    if (on_behalf && (!(cfg->flags & CFG_HOST_ROUTING) || !ct || !ct_macs_known(ct, cfg) ||
                      (ct->flags & CT_REDIRECTED) || tcp_opens(t)))
        return TC_ACT_OK;  // (a SYN may open a flow anew: to_endpoint decides)
    if (ct && ct->direction != dir) {
        if (tcp_opens(t)) {
            // A new connection on the reversed tuple of an old one (roles swapped): never a
            // reply; forget the old entry and check it as a new flow.
            ct_forget(&key, &key6, v6);
            ct = NULL;
        } else {
            // A reply: the other direction of a flow this endpoint tracks.
            ct_touch(ct, cfg, t, 1);
            count(dir, VERDICT_FORWARDED, REASON_CT_REPLY, len);
            return tracked_pass(skb, cfg, ct, t, dir, v6, deliver, on_behalf);
        }
    }
    if (ct && (ct->flags & CT_CLOSING) && tcp_opens(t)) {
        // A new connection on the tuple of one that closed: it gets its own verdict, from the
        // policy and identities of now (the old one may have been redirected, or its peer's
        // address may belong to another identity since), never the old flow's.
        ct_forget(&key, &key6, v6);
        ct = NULL;
    }
    if (ct) {
        if (ct->policy_gen != cfg->policy_gen) {
            // Policy changed since this flow was allowed: re-check it once.
            ep = ep_by_ifindex.lookup(&ifindex);
            if (!ep)
                return TC_ACT_OK;  // not an endpoint (any more)
            policy_lookup(ep->endpoint_id, dir == DIR_INGRESS ? ct->src_identity : ct->dst_identity,
                          dir, t->proto, t->dport, &v);
            verdict = decide(ep, dir, &v, &reason);
            if (verdict == VERDICT_REDIRECTED && from_proxy)
                verdict = VERDICT_FORWARDED;
            __u32 unused_ep;
            if (verdict == VERDICT_FORWARDED && dir == DIR_EGRESS &&
                local_ingress_redirect(t, local_endpoint(t, v6), ct->src_identity, &v,
                                       &unused_ep))
                verdict = VERDICT_REDIRECTED;
            if (verdict == VERDICT_DROPPED ||
                (verdict == VERDICT_REDIRECTED) != ((ct->flags & CT_REDIRECTED) != 0)) {
                // Denied now, or moved in/out of the proxy mid-stream: cut the flow.
                if (verdict != VERDICT_DROPPED)
                    reason = REASON_POLICY_DENIED;
                __u32 src = ct->src_identity, dst = ct->dst_identity;
                ct_forget(&key, &key6, v6);
                count(dir, VERDICT_DROPPED, reason, len);
                emit_family(t, src, dst, ep->endpoint_id, dir, VERDICT_DROPPED, reason, &v, v6);
                return TC_ACT_SHOT;
            }
            ct->policy_gen = cfg->policy_gen;
        }
        ct_touch(ct, cfg, t, 0);
        if (ct->flags & CT_REDIRECTED) {
            if (assign_to_proxy_family(skb, t, ct->proxy_port, v6) < 0) {
                count(dir, VERDICT_DROPPED, REASON_NO_PROXY, len);
                emit_family(t, ct->src_identity, ct->dst_identity, ct->endpoint_id, dir,
                            VERDICT_DROPPED, REASON_NO_PROXY, 0, v6);
                return TC_ACT_SHOT;
            }
            count(dir, VERDICT_REDIRECTED, REASON_CT_ESTABLISHED, len);
            return TC_ACT_OK;
        }
        count(dir, VERDICT_FORWARDED, REASON_CT_ESTABLISHED, len);
        return tracked_pass(skb, cfg, ct, t, dir, v6, deliver, on_behalf);
    }

    // A new flow: look up the endpoint, the peer's identity and the endpoint's policy.
    // (Tracked packets above never need the endpoint: one lookup less per packet.)
    ep = ep_by_ifindex.lookup(&ifindex);
    if (!ep)
        return TC_ACT_OK;
    __u32 peer = dir == DIR_INGRESS && marked ? mark_identity : peer_identity(t, dir, v6);
    __u32 src_id = dir == DIR_INGRESS ? peer : ep->identity;
    __u32 dst_id = dir == DIR_INGRESS ? ep->identity : peer;
    __u32 event_ep = ep->endpoint_id;
    policy_lookup(ep->endpoint_id, peer, dir, t->proto, t->dport, &v);
    verdict = decide(ep, dir, &v, &reason);
    if (verdict == VERDICT_REDIRECTED && dir == DIR_INGRESS) {
        if (from_proxy) {
            verdict = VERDICT_FORWARDED;  // the proxy already applied the L7 rules
        } else {
            // Ingress redirects happen at the source's from-endpoint; anything else that
            // needs the proxy cannot reach it from here: fail closed.
            verdict = VERDICT_DROPPED;
            reason = REASON_NO_PROXY;
        }
    }
    __u32 delivery = 0;  // a local endpoint's veth
    if (verdict == VERDICT_FORWARDED && dir == DIR_EGRESS) {
        struct endpoint_info *dst = local_endpoint(t, v6);
        if (local_ingress_redirect(t, dst, src_id, &v, &event_ep))
            verdict = VERDICT_REDIRECTED;
        else
            delivery = delivery_ifindex(dst);
    }
    if (verdict == VERDICT_REDIRECTED &&
        assign_to_proxy_family(skb, t, v.value.proxy_port, v6) < 0) {
        verdict = VERDICT_DROPPED;
        reason = REASON_NO_PROXY;
    }
    if (verdict == VERDICT_DROPPED) {
        count(dir, verdict, reason, len);
        emit_family(t, src_id, dst_id, event_ep, dir, verdict, reason, &v, v6);
        return TC_ACT_SHOT;
    }

    // Only a SYN opens a TCP flow. A mid-stream packet without an entry (a flow cut by a policy
    // change, or one that predates the datapath) is checked packet by packet; creating an entry
    // for it would let the cut flow's other direction pass as "replies".
    if (t->proto == IPPROTO_TCP && !tcp_opens(t)) {
        count(dir, verdict, reason, len);
        return TC_ACT_OK;
    }

    struct ct_entry entry = {
        .orig_saddr = t->saddr,
        .orig_sport = t->sport,
        .direction = dir,
        .src_identity = src_id,
        .dst_identity = dst_id,
        .policy_gen = cfg->policy_gen,
        .endpoint_id = ep->endpoint_id,
        .proxy_port = verdict == VERDICT_REDIRECTED ? v.value.proxy_port : 0,
        .flags = verdict == VERDICT_REDIRECTED ? CT_REDIRECTED : 0,
        .tcp_flags = t->tcp_flags,
        .deliver_ifindex = delivery,
        // An entry made by to_endpoint learns its delivery on the first packet back.
        .deliver_gen = dir == DIR_EGRESS ? cfg->ep_gen : cfg->ep_gen - 1,
    };
    if (t->tcp_flags & (TCP_FLAG_FIN | TCP_FLAG_RST))
        entry.flags |= CT_CLOSING;
    entry.expires_ns = bpf_ktime_get_coarse_ns() + ct_lifetime(cfg, t, entry.flags);
    entry.refreshed = (__u32)bpf_jiffies64();
    ct_learn_macs(skb, &entry, cfg, dir);
    ct_store(&key, &key6, &entry, v6);
    count(dir, verdict, reason, len);
    if (verdict == VERDICT_REDIRECTED || (cfg->flags & CFG_EVENTS_FORWARDED))
        emit_family(t, src_id, dst_id, event_ep, dir, verdict, reason, &v, v6);
    if (verdict == VERDICT_FORWARDED && dir == DIR_EGRESS && (cfg->flags & CFG_HOST_ROUTING))
        *deliver = delivery;
    return TC_ACT_OK;
}

// A packet for the local endpoint whose host-side veth is ifindex, away from that veth (from
// another endpoint's or from another node): judged by the endpoint's ingress on its behalf and,
// when that takes it, handed to the pod side of the veth in the pod's namespace
// (bpf_redirect_peer), addressed to the pod's MAC. Otherwise dropped, or left (TC_ACT_OK) to
// the stack and to_endpoint. A peer redirect scrubs as within one namespace, so the host's mark
// (the overlay's identity) is cleared here: it would steer the pod's own routing rules and
// fwmark-accepting sockets. known: the endpoint's entry for the flow, if already looked up.
static __always_inline int hand_over(struct __sk_buff *skb, struct tuple *t, const int v6,
                                     __u32 ifindex, struct ct_entry *known)
{
    __u32 ready = 0;
    int rc = handle_family(skb, DIR_INGRESS, t, v6, ifindex, &ready, 1, known);
    if (rc != TC_ACT_OK || !ready)
        return rc;
    skb->mark = 0;
    return bpf_redirect_peer(ifindex, 0);
}

// A packet leaving its endpoint. With host routing, one addressed to another endpoint of this
// node is judged here twice, as Cilium's from-container does with the destination's policy
// program: by the source's egress policy and conntrack entry, then by the destination's ingress
// policy and entry (keyed by the destination's veth, the entry to_endpoint keeps for packets
// that come through the stack), and then handed into the destination's namespace with
// bpf_redirect_peer. The packet skips the host's forwarding path, the destination veth's
// transmit and tc egress (to_endpoint) and the backlog queue: one program run per packet where
// bpf_redirect_neigh to the veth took two and a veth transmit.
static __always_inline int leave_endpoint(struct __sk_buff *skb, struct tuple *t, const int v6)
{
    __u32 deliver = 0;
    int rc = handle_family(skb, DIR_EGRESS, t, v6, skb->ifindex, &deliver, 0, 0);
    if (rc != TC_ACT_OK || !deliver)
        return rc;
    return hand_over(skb, t, v6, deliver, 0);
}

// tc ingress of the host-side veth: packets leaving the endpoint (its egress policy).
int from_endpoint(struct __sk_buff *skb)
{
    struct tuple t;
    int parsed = parse(skb, &t);
    if (parsed == PARSE_IPV6)
        return leave_endpoint(skb, &t, 1);
    if (parsed < 0)
        return TC_ACT_OK;  // not IP (ARP) or truncated
    return leave_endpoint(skb, &t, 0);
}

// tc egress of the host-side veth: packets entering the endpoint (its ingress policy) that came
// through the stack or from another node.
int to_endpoint(struct __sk_buff *skb)
{
    struct tuple t;
    __u32 unused = 0;
    int parsed = parse(skb, &t);
    if (parsed == PARSE_IPV6)
        return handle_family(skb, DIR_INGRESS, &t, 1, skb->ifindex, &unused, 0, 0);
    if (parsed < 0)
        return TC_ACT_OK;  // not IP (ARP) or truncated
    return handle_family(skb, DIR_INGRESS, &t, 0, skb->ifindex, &unused, 0, 0);
}

// -- across nodes (redirect_bpf/overlay.py attaches these) ------------------------------------

// The node proxy's upstream to another node's pod connects from the client pod's address (so
// the far side sees the client, also its proxy), so the answers are addressed to a local pod:
// hand them to the proxy's socket, which this namespace holds, instead of routing them to the
// pod. The caller knows the destination is a local endpoint. Returns 1 when assigned.
static __always_inline int proxy_upstream_answer(struct __sk_buff *skb, struct tuple *t,
                                                 const int v6)
{
    if (t->proto != IPPROTO_TCP)
        return 0;
    struct bpf_sock_tuple st = {};
    __u32 st_size = v6 ? sizeof(st.ipv6) : sizeof(st.ipv4);
    packet_tuple(&st, t, v6);
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &st, st_size, BPF_F_CURRENT_NETNS, 0);
    if (!sk)
        return 0;
    long ret = -1;
    if (sk->state != BPF_TCP_LISTEN)
        ret = bpf_sk_assign(skb, sk, 0);
    bpf_sk_release(sk);
    if (ret != 0)
        return 0;
    skb->mark = MARK_TO_PROXY;
    count(DIR_INGRESS, VERDICT_REDIRECTED, REASON_CT_REPLY, skb->len);
    return 1;
}

// A packet from another node to a local endpoint (v6 a constant: each family gets its own
// copy, so IPv4 keeps its 32-bit lookups). A flow the endpoint's own hooks track (either
// direction) goes on to to_endpoint through the stack, or with host routing is judged by the
// endpoint's ingress here and handed into its namespace (hand_over). Otherwise: an answer to
// the proxy's upstream goes to the proxy's socket, and a flow the endpoint's ingress policy
// sends to the proxy is assigned here (tc ingress is the only place bpf_sk_assign works);
// anything else goes on to to_endpoint, which checks the policy with the same identity.
static __always_inline int remote_ingress(struct __sk_buff *skb, struct tuple *t, __u32 src_id,
                                          const int v6)
{
    struct endpoint_info *ep = local_endpoint(t, v6);
    if (!ep || ep->sidecar_port)
        return TC_ACT_OK;
    struct ct_key key = {};
    struct ct6_key key6 = {};
    if (v6)
        ct6_key_of(t, ep->ifindex, &key6);
    else
        ct_key_of(t, ep->ifindex, &key);
    struct ct_entry *ct = ct_find(&key, &key6, v6);
    if (ct)  // the identity from the tunnel (the mark) or the ipcache, as to_endpoint takes it
        return hand_over(skb, t, v6, ep->ifindex, ct);
    if (proxy_upstream_answer(skb, t, v6))
        return TC_ACT_OK;
    struct verdict v = {};
    policy_lookup(ep->endpoint_id, src_id, DIR_INGRESS, t->proto, t->dport, &v);
    if (!v.found || v.value.deny || !v.value.redirect)
        return TC_ACT_OK;
    __u8 syn = tcp_opens(t);
    if (assign_to_proxy_family(skb, t, v.value.proxy_port, v6) < 0) {
        count(DIR_INGRESS, VERDICT_DROPPED, REASON_NO_PROXY, skb->len);
        emit_family(t, src_id, ep->identity, ep->endpoint_id, DIR_INGRESS, VERDICT_DROPPED,
                    REASON_NO_PROXY, &v, v6);
        return TC_ACT_SHOT;
    }
    count(DIR_INGRESS, VERDICT_REDIRECTED, syn ? REASON_NEW_FLOW : REASON_CT_ESTABLISHED,
          skb->len);
    if (syn)
        emit_family(t, src_id, ep->identity, ep->endpoint_id, DIR_INGRESS, VERDICT_REDIRECTED,
                    REASON_NEW_FLOW, &v, v6);
    return TC_ACT_OK;
}

static __always_inline int overlay_drop(struct __sk_buff *skb, struct tuple *t, __u32 src_id,
                                        __u8 dir, __u8 reason, const int v6)
{
    count(dir, VERDICT_DROPPED, reason, skb->len);
    __u32 dst_id = v6 ? identity_of6(t->daddr6) : identity_of(t->daddr);
    emit_family(t, src_id, dst_id, 0, dir, VERDICT_DROPPED, reason, 0, v6);
    return TC_ACT_SHOT;
}

// from_overlay for one inner family. The VNI is the source identity, believed only when the
// outer source (always IPv4: the underlay is IPv4 for both inner families) is a known node.
static __always_inline int from_overlay_family(struct __sk_buff *skb, struct tuple *t,
                                               const int v6)
{
    struct bpf_tunnel_key tk = {};
    __u32 world = v6 ? IDENTITY_WORLD_IPV6 : IDENTITY_WORLD;
    if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), 0) < 0)
        return overlay_drop(skb, t, world, DIR_INGRESS, REASON_UNKNOWN_TUNNEL_SOURCE, v6);
    __be32 outer_src = bpf_htonl(tk.remote_ipv4);
    __u32 src_id = tk.tunnel_id & MARK_IDENTITY_MASK;
    if (!nodes.lookup(&outer_src))
        return overlay_drop(skb, t, src_id, DIR_INGRESS, REASON_UNKNOWN_TUNNEL_SOURCE, v6);
    if (src_id == IDENTITY_ANY || src_id == IDENTITY_HOST)
        return overlay_drop(skb, t, src_id, DIR_INGRESS, REASON_INVALID_IDENTITY, v6);
    // The inner frame's destination MAC is the sender's device (VXLAN here runs without ARP):
    // make the stack take it as ours, and carry the identity to to_endpoint in the mark.
    bpf_skb_change_type(skb, 0 /* PACKET_HOST */);
    skb->mark = MARK_FROM_OVERLAY | src_id;
    return remote_ingress(skb, t, src_id, v6);
}

// tc ingress of the VXLAN device (collect-metadata mode): a decapsulated IPv4 or IPv6 packet.
int from_overlay(struct __sk_buff *skb)
{
    struct tuple t = {};
    int parsed = parse(skb, &t);
    if (parsed == PARSE_IPV6)
        return from_overlay_family(skb, &t, 1);
    if (parsed != 0)
        return TC_ACT_SHOT;  // not IP, or truncated
    return from_overlay_family(skb, &t, 0);
}

// to_overlay for one inner family: the tunnel endpoint of the destination (ipcache or
// ipcache6; the endpoint is an IPv4 underlay address either way) and the source identity.
static __always_inline int to_overlay_family(struct __sk_buff *skb, struct tuple *t,
                                             const int v6)
{
    __u32 src_id = IDENTITY_REMOTE_NODE;
    struct endpoint_info *ep = 0;
    struct ipcache_value *dst;
    if ((skb->mark & MARK_MAGIC_MASK) == MARK_FROM_PROXY) {
        src_id = skb->mark & MARK_IDENTITY_MASK;
    } else if (v6) {
        struct ip6_key saddr6;
        __builtin_memcpy(saddr6.addr, t->saddr6, 16);
        ep = ep_by_ip6.lookup(&saddr6);
    } else {
        __be32 saddr = t->saddr;
        ep = ep_by_ip.lookup(&saddr);
    }
    if (ep)
        src_id = ep->identity;
    if (v6) {
        struct ipcache6_key key6 = {.prefixlen = 128};
        __builtin_memcpy(key6.addr, t->daddr6, 16);
        dst = ipcache6.lookup(&key6);
    } else {
        struct ipcache_key key = {.prefixlen = 32, .addr = t->daddr};
        dst = ipcache.lookup(&key);
    }
    if (!dst || !dst->tunnel_endpoint)
        return overlay_drop(skb, t, src_id, DIR_EGRESS, REASON_NO_TUNNEL_ENDPOINT, v6);
    struct bpf_tunnel_key tk = {
        .remote_ipv4 = bpf_ntohl(dst->tunnel_endpoint),
        .tunnel_id = src_id,
        .tunnel_ttl = 64,
    };
    if (bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), BPF_F_ZERO_CSUM_TX) < 0)
        return TC_ACT_SHOT;
    return TC_ACT_OK;
}

// tc egress of the VXLAN device: everything routed into the cluster CIDRs. The tunnel goes to
// the node the ipcache names for the destination, the VNI is the source identity: the proxy's
// mark, else the local endpoint's identity, else this node's own traffic (remote-node there).
int to_overlay(struct __sk_buff *skb)
{
    struct tuple t = {};
    int parsed = parse(skb, &t);
    if (parsed == PARSE_IPV6)
        return to_overlay_family(skb, &t, 1);
    if (parsed != 0)
        return TC_ACT_SHOT;
    return to_overlay_family(skb, &t, 0);
}

// tc ingress of the underlay device in native routing: no identity on the wire, the ipcache
// knows the source (unknown -> world / world-ipv6). Only the proxy's sockets are served here
// (answers to its upstreams, redirects by the ingress policy); to_endpoint does the rest.
int from_netdev(struct __sk_buff *skb)
{
    struct tuple t = {};
    int parsed = parse(skb, &t);
    if (parsed == PARSE_IPV6)
        return remote_ingress(skb, &t, identity_of6(t.saddr6), 1);
    if (parsed != 0)
        return TC_ACT_OK;
    return remote_ingress(skb, &t, identity_of(t.saddr), 0);
}

#define SIDECAR_PASS 0
#define SIDECAR_DENY 1
#define SIDECAR_REDIRECT 2

// Sidecar mode, shared by connect4 and connect6: the verdict for a connect() to daddr:dport
// (daddr6 for a native IPv6 destination, v6 a constant) from this cgroup; on redirect the
// original destination is kept by socket cookie.
static __always_inline int sidecar_decide_family(struct bpf_sock_addr *ctx, __be32 daddr,
                                                 __be32 *daddr6, __be16 dport,
                                                 __u16 *sidecar_port, const int v6)
{
    if (ctx->protocol != IPPROTO_TCP)
        return SIDECAR_PASS;
    __u64 cgroup = bpf_get_current_cgroup_id();
    struct endpoint_info *ep = ep_by_cgroup.lookup(&cgroup);
    if (!ep || ep->sidecar_port == 0)
        return SIDECAR_PASS;
    struct bpf_sock *sk = ctx->sk;
    if (sk && (sk->mark & MARK_MAGIC_MASK) == MARK_FROM_PROXY)
        return SIDECAR_PASS;  // the proxy's own upstream connection
    if (!v6 && daddr == bpf_htonl(0x7f000001) && dport == bpf_htons(ep->sidecar_port))
        return SIDECAR_PASS;
    __u32 dst_id = v6 ? identity_of6(daddr6) : identity_of(daddr);
    struct verdict v = {};
    __u8 reason;
    policy_lookup(ep->endpoint_id, dst_id, DIR_EGRESS, IPPROTO_TCP, dport, &v);
    __u8 verdict = decide(ep, DIR_EGRESS, &v, &reason);
    struct tuple t = {.saddr = 0, .daddr = daddr, .sport = 0, .dport = dport,
                      .proto = IPPROTO_TCP};
    if (v6)
        __builtin_memcpy(t.daddr6, daddr6, 16);
    if (verdict == VERDICT_DROPPED) {
        count(DIR_EGRESS, verdict, reason, 0);
        emit_family(&t, ep->identity, dst_id, ep->endpoint_id, DIR_EGRESS, verdict, reason, &v,
                    v6);
        return SIDECAR_DENY;
    }
    if (verdict != VERDICT_REDIRECTED)
        return SIDECAR_PASS;
    struct sidecar_orig orig = {
        .daddr = daddr,
        .dport = dport,
        .src_identity = ep->identity,
        .dst_identity = dst_id,
    };
    if (v6)
        __builtin_memcpy(orig.daddr6, daddr6, 16);
    __u64 cookie = bpf_get_socket_cookie(ctx);
    sidecar_by_cookie.update(&cookie, &orig);
    *sidecar_port = ep->sidecar_port;
    count(DIR_EGRESS, VERDICT_REDIRECTED, REASON_NEW_FLOW, 0);
    emit_family(&t, ep->identity, dst_id, ep->endpoint_id, DIR_EGRESS, VERDICT_REDIRECTED,
                REASON_NEW_FLOW, &v, v6);
    return SIDECAR_REDIRECT;
}

static __always_inline int sidecar_decide(struct bpf_sock_addr *ctx, __be32 daddr,
                                          __be16 dport, __u16 *sidecar_port)
{
    return sidecar_decide_family(ctx, daddr, 0, dport, sidecar_port, 0);
}

// Sidecar mode, cgroup/connect4: an L7-marked connect() goes to the sidecar proxy on
// 127.0.0.1:sidecar_port; a denied one fails with EPERM.
int sidecar_connect4(struct bpf_sock_addr *ctx)
{
    __u16 port = 0;
    int action = sidecar_decide(ctx, ctx->user_ip4, (__be16)ctx->user_port, &port);
    if (action == SIDECAR_DENY)
        return 0;
    if (action == SIDECAR_REDIRECT) {
        ctx->user_ip4 = bpf_htonl(0x7f000001);
        ctx->user_port = bpf_htons(port);
    }
    return 1;
}

// Sidecar mode, cgroup/connect6: the same for AF_INET6 sockets. An IPv4-mapped destination
// (::ffff:a.b.c.d) is checked as IPv4; a native IPv6 one against ipcache6. Either way a
// redirect goes to ::ffff:127.0.0.1:sidecar_port, the sidecar's one IPv4 listener (so an
// IPV6_V6ONLY socket cannot be redirected: its connect() fails), and the original IPv6
// destination is kept in sidecar_orig.daddr6.
int sidecar_connect6(struct bpf_sock_addr *ctx)
{
    __u16 port = 0;
    int action;
    if (ctx->user_ip6[0] != 0 || ctx->user_ip6[1] != 0 ||
        ctx->user_ip6[2] != bpf_htonl(0x0000ffff)) {
        __be32 daddr6[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2],
                            ctx->user_ip6[3]};
        action = sidecar_decide_family(ctx, 0, daddr6, (__be16)ctx->user_port, &port, 1);
        if (action == SIDECAR_DENY)
            return 0;
        if (action == SIDECAR_REDIRECT) {
            ctx->user_ip6[0] = 0;
            ctx->user_ip6[1] = 0;
            ctx->user_ip6[2] = bpf_htonl(0x0000ffff);
            ctx->user_ip6[3] = bpf_htonl(0x7f000001);
            ctx->user_port = bpf_htons(port);
        }
        return 1;
    }
    action = sidecar_decide(ctx, ctx->user_ip6[3], (__be16)ctx->user_port, &port);
    if (action == SIDECAR_DENY)
        return 0;
    if (action == SIDECAR_REDIRECT) {
        ctx->user_ip6[3] = bpf_htonl(0x7f000001);  // ::ffff:127.0.0.1
        ctx->user_port = bpf_htons(port);
    }
    return 1;
}

// Sidecar mode, sock_ops on the client's socket: the key of its connection to the sidecar.
static __always_inline void sidecar_key_of(struct bpf_sock_ops *skops, struct sidecar_addr *key)
{
    // Read both fields, then pick: a conditional field offset is rejected by the verifier.
    __be32 local4 = skops->local_ip4;
    __be32 local6 = skops->local_ip6[3];
    key->netns = bpf_get_netns_cookie(skops);
    key->ip = skops->family == 2 ? local4 : local6;
    key->port = bpf_htons((__u16)skops->local_port);
    key->proxy_port = bpf_htons((__u16)bpf_ntohl(skops->remote_port));  // u32, network order
}

// Sidecar mode, sock_ops: once the local port is chosen, re-key the original destination by
// the connection (namespace, client address, sidecar port) so the proxy can find it from its
// accepted socket, and follow the socket's state so the entry leaves with the connection.
int sidecar_sockops(struct bpf_sock_ops *skops)
{
    if (skops->family != 2 /* AF_INET */ && skops->family != 10 /* AF_INET6, v4-mapped */)
        return 1;
    struct sidecar_addr key = {};
    if (skops->op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
        __u64 cookie = bpf_get_socket_cookie(skops);
        struct sidecar_orig *orig = sidecar_by_cookie.lookup(&cookie);
        if (!orig)
            return 1;
        sidecar_key_of(skops, &key);
        struct sidecar_orig copy = *orig;
        copy.flags = 0;
        sidecar_by_addr.update(&key, &copy);
        sidecar_by_cookie.delete(&cookie);
        bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
        return 1;
    }
    if (skops->op != BPF_SOCK_OPS_STATE_CB || skops->args[1] != BPF_TCP_CLOSE)
        return 1;
    // The client's socket is done. Never connected (the sidecar refused or timed out), or a
    // proxy read the entry already: delete it. Connected but unread (the client sent and closed
    // before the proxy accepted): leave it for the proxy, which deletes what it reads.
    sidecar_key_of(skops, &key);
    struct sidecar_orig *orig = sidecar_by_addr.lookup(&key);
    if (!orig)
        return 1;
    if (skops->args[0] == BPF_TCP_SYN_SENT || (orig->flags & SIDECAR_READ))
        sidecar_by_addr.delete(&key);
    else
        orig->flags |= SIDECAR_CLIENT_CLOSED;
    return 1;
}

// Sidecar mode, cgroup/getsockopt on the proxy's cgroup: getsockopt(SOL_IP, SO_ORIGINAL_DST)
// on an accepted connection answers with the destination connect4/connect6 rewrote, so proxies
// that ask the standard question (as behind iptables REDIRECT) work unmodified. IPv6:
// getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST) (same number, 80) answers a struct sockaddr_in6
// (an IPv4 destination as ::ffff:a.b.c.d), and so does SOL_IP for a native IPv6 destination
// when the caller's buffer holds one (Envoy passes a sockaddr_storage and reads its family; a
// 16-byte buffer gets the kernel's own answer, ENOENT).
#define SOL_IPV6_LEVEL 41
#define SO_ORIGINAL_DST_OPT 80  // also IP6T_SO_ORIGINAL_DST

struct sockaddr_in6_out {
    __u16 family;
    __be16 port;
    __be32 flowinfo;
    __be32 addr[4];
    __u32 scope_id;
};

int sidecar_getsockopt(struct bpf_sockopt *ctx)
{
    if ((ctx->level != 0 /* SOL_IP */ && ctx->level != SOL_IPV6_LEVEL) ||
        ctx->optname != SO_ORIGINAL_DST_OPT)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk)
        return 1;
    // The accepted socket: its peer is the client, its local port the sidecar's, and it lives
    // in the endpoint's namespace like the client.
    struct sidecar_addr key = {
        .netns = bpf_get_netns_cookie(ctx),
        .ip = sk->dst_ip4,
        .port = (__be16)sk->dst_port,
        .proxy_port = bpf_htons((__u16)sk->src_port),
    };
    struct sidecar_orig *orig = sidecar_by_addr.lookup(&key);
    if (!orig)
        return 1;  // not ours
    if (ctx->level == 0 && orig->daddr != 0) {
        struct sockaddr_in *sin = ctx->optval;
        if ((void *)(sin + 1) > ctx->optval_end)
            return 1;
        sin->sin_family = 2;  // AF_INET
        sin->sin_port = orig->dport;
        sin->sin_addr.s_addr = orig->daddr;
        ctx->optlen = sizeof(*sin);
    } else {
        struct sockaddr_in6_out *sin6 = ctx->optval;
        if ((void *)(sin6 + 1) > ctx->optval_end)
            return 1;
        sin6->family = 10;  // AF_INET6
        sin6->port = orig->dport;
        sin6->flowinfo = 0;
        sin6->scope_id = 0;
        if (orig->daddr != 0) {
            sin6->addr[0] = 0;
            sin6->addr[1] = 0;
            sin6->addr[2] = bpf_htonl(0xffff);
            sin6->addr[3] = orig->daddr;
        } else {
            sin6->addr[0] = orig->daddr6[0];
            sin6->addr[1] = orig->daddr6[1];
            sin6->addr[2] = orig->daddr6[2];
            sin6->addr[3] = orig->daddr6[3];
        }
        ctx->optlen = sizeof(*sin6);
    }
    asm volatile("" ::: "memory");  // 4-byte stores: the verifier rejects merged 8-byte ones
    ctx->retval = 0;
    // Asked again on the same socket, the proxy gets the same answer until the client closes.
    if (orig->flags & SIDECAR_CLIENT_CLOSED)
        sidecar_by_addr.delete(&key);
    else
        orig->flags |= SIDECAR_READ;
    return 1;
}
