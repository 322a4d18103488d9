// Socket-level service load balancing: cgroup sock_addr programs translate a service VIP to a
// backend when the socket is connected (connect4) or a datagram is sent (sendmsg4), and back
// when the application asks who its peer is (getpeername4) or receives a datagram (recvmsg4).
// There is no per-packet NAT for this traffic: the packets carry the backend's address, so the
// tc programs (datapath.c) judge the backend's identity and port, and L7 redirection works as
// for any other connection. Loaded apart from datapath.c by redirect_bpf/sock_lb.py.
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include "sock_lb.h"

#define NSEC 1000000000ULL

BPF_HASH(lb_services, struct lb_svc_key, struct lb_svc, LB_SERVICE_MAP_SIZE);
BPF_HASH(lb_revs, __u32, struct lb_rev, LB_REV_MAP_SIZE);
BPF_HASH(lb_slots, struct lb_slot_key, __u32, LB_BACKEND_MAP_SIZE);
BPF_HASH(lb_backends, __u32, struct lb_backend, LB_BACKEND_MAP_SIZE);
BPF_F_TABLE("hash", struct lb_maglev_key, struct lb_maglev_chunk, lb_maglev, LB_MAGLEV_MAP_SIZE,
            BPF_F_NO_PREALLOC);
BPF_TABLE("lru_hash", struct lb_affinity_key, struct lb_affinity_val, lb_affinity,
          LB_AFFINITY_MAP_SIZE);
BPF_TABLE("lru_hash", struct lb_revnat_key, struct lb_revnat_val, lb_revnat,
          LB_REVNAT_MAP_SIZE);
BPF_HASH(lb_svc_stats, __u32, struct lb_svc_stats, LB_SERVICE_MAP_SIZE);

// A 64-bit finalizer (splitmix64): spreads socket cookies, which count up, over the table.
// redirect_bpf/sock_lb_structs.py mirrors it so tests can predict a socket's slot.
static __always_inline __u64 mix64(__u64 x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

#define LB_LOOKUP_TRIES 4

#ifdef LB_TEST_READER_DELAY
// Fault injection (tests/kernel/test_sock_lb_churn.py compiles with it): a reader that holds
// what it looked up for a while (LB_TEST_READER_DELAY clock reads, tens of microseconds), as
// one on a busy or preempted CPU does, so a writer's ordering faults show in every run instead
// of once in a while. A fixed count: a loop that may end early costs the verifier a path per
// iteration.
static __always_inline void reader_delay(void)
{
    __u64 sink = 0;
    for (int i = 0; i < LB_TEST_READER_DELAY; i++)
        sink += bpf_ktime_get_ns();
    asm volatile("" : : "r"(sink));
}
#else
static __always_inline void reader_delay(void) {}
#endif

// The service's current revision, copied: 1 found, 0 not a service, -1 none consistent (the
// call fails rather than go to the VIP untranslated). The revision an lb_services element
// names is checked to be this service's: an element replaced by a concurrent update can be
// reused at once for another key (hash maps recycle freed elements), and a reader holding it
// would read that key's revision. The revision itself is never modified while in use.
static __always_inline int lb_lookup(struct lb_svc_key *key, struct lb_rev *out, __u32 *rev_out)
{
#pragma unroll
    for (int i = 0; i < LB_LOOKUP_TRIES; i++) {
        struct lb_svc *svc = lb_services.lookup(key);
        if (!svc)
            return 0;
        if (i == 0)
            reader_delay();
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

static __always_inline __u32 pick_backend(struct lb_rev *svc, __u32 rev, __u64 cookie,
                                          int per_socket)
{
    __u32 id = 0;
    if (svc->count == 0)
        return 0;
    if (svc->flags & LB_FLAG_MAGLEV) {
        __u64 m = svc->maglev_m;
        if (m == 0 || m > MAGLEV_MAX_M)
            return 0;
        __u32 slot = (__u32)(mix64(cookie) % m);
        struct lb_maglev_key mkey = {.rev = rev, .chunk = slot >> MAGLEV_CHUNK_SHIFT};
        struct lb_maglev_chunk *chunk = lb_maglev.lookup(&mkey);
        if (!chunk)
            return 0;
        id = chunk->ids[slot & (MAGLEV_CHUNK - 1)];
    } else {
        // Random; a datagram socket keeps one backend (its cookie picks it), so a UDP
        // "conversation" on an unconnected socket is not spread over backends per datagram.
        __u32 r = per_socket ? (__u32)mix64(cookie) : bpf_get_prandom_u32();
        reader_delay();
        struct lb_slot_key key = {.rev = rev, .slot = r % svc->count + 1};
        __u32 *found = lb_slots.lookup(&key);
        if (!found)
            return 0;
        id = *found;
    }
    return id;
}

// The backend for this socket: the client's pinned one while its affinity lasts, else a fresh
// pick (then pinned). The client is the socket's network namespace, as Cilium's socket LB does:
// the source address is not chosen yet at connect() time.
static __always_inline struct lb_backend *select_backend(struct bpf_sock_addr *ctx,
                                                         struct lb_rev *svc, __u32 rev,
                                                         __u64 cookie, int per_socket)
{
    struct lb_affinity_key akey = {};
    __u64 now = 0;
    __u32 id = 0;
    struct lb_backend *be;
    if (svc->flags & LB_FLAG_AFFINITY) {
        akey.netns_cookie = bpf_get_netns_cookie(ctx);
        akey.svc_id = svc->svc_id;
        now = bpf_ktime_get_ns();
        struct lb_affinity_val *aff = lb_affinity.lookup(&akey);
        if (aff && now - aff->last_ns < (__u64)svc->affinity_timeout_s * NSEC) {
            __u32 pinned = aff->backend_id;
            be = lb_backends.lookup(&pinned);
            if (be) {  // a backend removed from the service loses its clients at once
                aff->last_ns = now;
                return be;
            }
        }
    }
    id = pick_backend(svc, rev, cookie, per_socket);
    if (!id)
        return 0;
    be = lb_backends.lookup(&id);
    if (be && (svc->flags & LB_FLAG_AFFINITY)) {
        struct lb_affinity_val val = {.backend_id = id, .last_ns = now};
        lb_affinity.update(&akey, &val);
    }
    return be;
}

static __always_inline void count(__u32 svc_id, int per_socket, int found)
{
    struct lb_svc_stats *st = lb_svc_stats.lookup(&svc_id);
    if (!st) {
        struct lb_svc_stats zero = {};
        lb_svc_stats.update(&svc_id, &zero);  // BPF_ANY: a racing first writer is harmless
        st = lb_svc_stats.lookup(&svc_id);
        if (!st)
            return;
    }
    if (!found)
        __sync_fetch_and_add(&st->no_backend, 1);
    else if (per_socket == 2)
        __sync_fetch_and_add(&st->datagrams, 1);
    else
        __sync_fetch_and_add(&st->connects, 1);
}

// 1: translated or not a service; 0: a service without a usable backend (the call fails).
// per_socket: 0 TCP connect, 1 connected UDP, 2 a datagram of an unconnected UDP socket.
static __always_inline int translate(struct bpf_sock_addr *ctx, int per_socket)
{
    __u8 proto = ctx->protocol;
    if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
        return 1;
    struct lb_svc_key key = {.vip = ctx->user_ip4, .port = (__be16)ctx->user_port, .proto = proto};
    struct lb_rev svc;
    __u32 rev = 0;
    int found = lb_lookup(&key, &svc, &rev);
    if (found == 0)
        return 1;
    if (found < 0)
        return 0;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct lb_backend *be = select_backend(ctx, &svc, rev, cookie, per_socket);
    count(svc.svc_id, per_socket, be != 0);
    if (!be)
        return 0;
    struct lb_revnat_key rkey = {.cookie = cookie, .ip = be->ip, .port = be->port};
    struct lb_revnat_val rval = {.vip = key.vip, .port = key.port};
    lb_revnat.update(&rkey, &rval);
    ctx->user_ip4 = be->ip;
    ctx->user_port = be->port;
    return 1;
}

// The backend's address as the application's peer goes back to the VIP it asked for.
static __always_inline int reverse(struct bpf_sock_addr *ctx)
{
    struct lb_revnat_key rkey = {
        .cookie = bpf_get_socket_cookie(ctx),
        .ip = ctx->user_ip4,
        .port = (__be16)ctx->user_port,
    };
    struct lb_revnat_val *rval = lb_revnat.lookup(&rkey);
    if (rval) {
        ctx->user_ip4 = rval->vip;
        ctx->user_port = rval->port;
    }
    return 1;
}

int sock_lb_connect4(struct bpf_sock_addr *ctx)
{
    return translate(ctx, ctx->protocol == IPPROTO_UDP);
}

int sock_lb_sendmsg4(struct bpf_sock_addr *ctx)
{
    return translate(ctx, 2);
}

int sock_lb_recvmsg4(struct bpf_sock_addr *ctx)
{
    return reverse(ctx);
}

int sock_lb_getpeername4(struct bpf_sock_addr *ctx)
{
    return reverse(ctx);
}
