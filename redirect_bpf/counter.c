// Foundation probe: counts packets and bytes per direction seen by a tc classifier.
// It never changes a verdict (TC_ACT_OK); the datapath programs live in their own files.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

struct pkt_count {
    __u64 packets;
    __u64 bytes;
};

BPF_ARRAY(counts, struct pkt_count, 2);

static __always_inline int count(struct __sk_buff *skb, int slot)
{
    struct pkt_count *c = counts.lookup(&slot);
    if (c) {
        __sync_fetch_and_add(&c->packets, 1);
        __sync_fetch_and_add(&c->bytes, skb->len);
    }
    return TC_ACT_OK;
}

int count_ingress(struct __sk_buff *skb) { return count(skb, 0); }
int count_egress(struct __sk_buff *skb) { return count(skb, 1); }
