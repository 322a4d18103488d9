"""The proxy worker process in cluster mode: from the agent's state it knows other nodes' pods
(their identities, for the same verdicts as the agent's) and whether an upstream keeps the
client's address (a local pod to a pod elsewhere in the cluster CIDR), as the agent does."""

from __future__ import annotations

import policies
from l7proxy.agent.proxy_worker_process import WorkerView


def _state(**cluster) -> dict:
    allocator = policies.IdentityAllocator(None)
    web = allocator.allocate(policies.parse_labels("k8s:app=web"))
    remote = allocator.allocate(policies.parse_labels("k8s:app=backend"))
    endpoint = {"name": "web", "ip": "10.252.1.2", "identity": web, "labels": ["k8s:app=web"]}
    state = {
        "seq": "1-1",
        "revision": 0,
        "router": "10.252.1.1",
        "identities": allocator.to_state(),
        "endpoints": [endpoint],
        "documents": [],
        **cluster,
    }
    return state, web, remote


def test_the_worker_knows_other_nodes_pods_and_keeps_the_source_towards_them():
    state, web, remote = _state(cluster_cidr="10.252.0.0/16")
    state["remote"] = {"10.252.2.7/32": remote}
    view = WorkerView("node")
    view.apply(state)
    identity, labels, name = view.peer("10.252.2.7")
    assert identity == remote and "k8s:app=backend" in labels and name is None
    assert view.upstream_keeps_source("10.252.1.2", "10.252.2.7")
    assert not view.upstream_keeps_source("10.252.1.2", "10.252.1.2")  # a local pod
    assert not view.upstream_keeps_source("10.252.1.2", "192.0.2.9")  # outside the cluster
    assert not view.upstream_keeps_source("10.252.1.99", "10.252.2.7")  # not a pod here


def test_a_single_node_agent_s_state_keeps_nothing():
    state, _, _ = _state()  # no cluster keys: a single-node agent, or an older one
    view = WorkerView("node")
    view.apply(state)
    assert view.peer("10.252.2.7")[0] == policies.WORLD
    assert not view.upstream_keeps_source("10.252.1.2", "10.252.2.7")
