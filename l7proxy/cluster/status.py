"""What `l7proxy cluster status` shows, read from etcd: each node's record (present only while
its lease lives) and the cluster's policy revision, which says whether the node has caught up."""

from __future__ import annotations

from l7proxy.cluster import keys
from l7proxy.cluster.kvstore import EtcdKV
from l7proxy.cluster.records import NodeRecord, PolicySet


async def cluster_status(url: str) -> dict:
    kv = EtcdKV(url)
    try:
        items, _ = await kv.list(keys.NODES)
        policy = await kv.get(keys.POLICY)
        cidrs, _ = await kv.list(keys.PODCIDRS)
    finally:
        await kv.close()
    revision = PolicySet.loads(policy.value).revision if policy is not None else 0
    nodes = []
    for item in items:
        rec = NodeRecord.loads(item.value)
        if rec.policy_error:
            health = "error"
        elif rec.policy_revision != revision:
            health = "behind"
        else:
            health = "ok"
        nodes.append(
            {
                "name": rec.name,
                "underlay_ip": rec.underlay_ip,
                "pod_cidr": rec.pod_cidr,
                "pod_cidr6": rec.pod_cidr6,
                "underlay_ip6": rec.underlay_ip6,
                "routing": rec.routing,
                "health": health,
                "policy_revision": rec.policy_revision,
                "policy_error": rec.policy_error,
                "endpoints": rec.endpoints,
                "lease": f"{item.lease:x}",
            }
        )
    return {
        "kvstore": url,
        "revision": revision,
        "nodes": sorted(nodes, key=lambda n: n["name"]),
        "pod_cidrs": len(cidrs),
    }


def link_status(link) -> dict:
    """The `cluster` part of `l7proxy status` on one node."""
    return {
        "kvstore": link.config.url,
        "node": link.config.node,
        "state": "ok" if link.reachable else "unreachable",
        "detail": "" if link.reachable else link.unreachable_reason(),
        "lease": f"{link.lease:x}",
        "pod_cidr": link.pod_cidr,
        "pod_cidr6": link.pod_cidr6,
        "routing": link.config.routing,
        "underlay_ip": link.config.underlay_ip,
        "underlay_ip6": link.config.underlay_ip6,
        "remote_nodes": sorted(link.nodes),
        "remote_endpoints": len(link.remote_ips),
        "identities": len(link.identities.by_id),
        "waiting_for_identity": sorted(link.waiting),
        "policy_revision": link.policy.revision if link.policy else 0,
        "watch_resumes": {p: w.resumes for p, w in link.watches.items()},
        "watch_relists": {p: w.relists for p, w in link.watches.items()},
        "watch_errors": {p: w.handler_errors for p, w in link.watches.items()},
    }
