"""The cluster sink over the real maps of a loaded datapath (tunnel routing, so no netlink): what
node_up/ipcache_set write, that the agent's ipcache sync leaves those entries alone, and that a
sink built after a restart still removes a node an earlier agent learnt."""

from __future__ import annotations

import pytest

from redirect_bpf import ipcache, structs
from redirect_bpf.cluster_sink import ClusterDatapath

pytestmark = pytest.mark.bpf

UNDERLAY, MOVED, POD_CIDR, POD = "10.249.0.2", "10.249.0.3", "10.248.5.0/24", "10.248.5.7/32"


def _local_entries(dp) -> dict[str, int]:
    return {
        ipcache.cidr_of(k): v.identity
        for k, v in dp.maps["ipcache"].items()
        if not v.tunnel_endpoint
    }


@pytest.fixture
def sink(clean):
    """The shared topology's ipcache (its pods and hosts) is put back afterwards."""
    saved = _local_entries(clean.dp)
    s = ClusterDatapath(clean.dp, routing="tunnel", cluster_cidr="10.248.0.0/16")
    yield s
    s.node_down("nodeX")
    clean.dp.ipcache_sync(saved)


def test_node_up_writes_the_nodes_map_and_remote_node_entries(sink):
    sink.node_up("nodeX", UNDERLAY, POD_CIDR)
    sink.ipcache_set(POD, 4711, UNDERLAY)
    assert UNDERLAY in sink.nodes()
    ipc = sink.dp.maps["ipcache"]
    assert ipcache.entry(ipc, f"{UNDERLAY}/32") == (structs.IDENTITY_REMOTE_NODE, UNDERLAY)
    assert ipcache.entry(ipc, "10.248.5.1/32") == (structs.IDENTITY_REMOTE_NODE, UNDERLAY)
    assert ipcache.entry(ipc, POD_CIDR) == (structs.IDENTITY_WORLD, UNDERLAY)
    assert ipcache.entry(ipc, POD) == (4711, UNDERLAY)
    assert sink.dp.ipcache_lookup("10.248.5.7") == 4711


def test_the_agents_ipcache_sync_leaves_the_sinks_entries_alone(sink):
    sink.node_up("nodeX", UNDERLAY, POD_CIDR)
    sink.ipcache_set(POD, 4711, UNDERLAY)
    # the agent's view: its own entries, and a CIDR identity for the same /32 as the pod
    saved = _local_entries(sink.dp)
    sink.dp.ipcache_sync({**saved, "10.250.99.0/24": 16777300, POD: 16777301})
    ipc = sink.dp.maps["ipcache"]
    assert ipcache.entry(ipc, POD) == (4711, UNDERLAY)
    assert ipcache.entry(ipc, POD_CIDR) == (structs.IDENTITY_WORLD, UNDERLAY)
    assert ipcache.entry(ipc, "10.250.99.0/24") == (16777300, None)
    sink.dp.ipcache_sync(saved)
    assert ipcache.entry(ipc, "10.250.99.0/24") is None
    assert ipcache.entry(ipc, POD) == (4711, UNDERLAY)


def test_a_restarted_agent_s_sink_removes_a_node_it_did_not_learn(sink):
    sink.node_up("nodeX", UNDERLAY, POD_CIDR)
    sink.ipcache_set(POD, 4711, UNDERLAY)
    again = ClusterDatapath(sink.dp, routing="tunnel", cluster_cidr="10.248.0.0/16")
    again.node_down("nodeX")
    assert UNDERLAY not in again.nodes()
    assert ipcache.remote_entries(sink.dp.maps["ipcache"]) == {}


def test_a_node_that_moved_keeps_only_its_new_underlay_address(sink):
    sink.node_up("nodeX", UNDERLAY, POD_CIDR)
    sink.node_up("nodeX", MOVED, POD_CIDR)
    assert UNDERLAY not in sink.nodes() and MOVED in sink.nodes()
    tunnels = {t for _, t in ipcache.remote_entries(sink.dp.maps["ipcache"]).values()}
    assert tunnels == {MOVED}


class _StaleView:
    """The real ipcache map, except that items() is the view sync() read a moment before the
    sink (another thread) put POD: sync's write lands after the sink's."""

    def __init__(self, real, stale: list):
        self.real, self.stale = real, stale

    def items(self):
        return iter(self.stale)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_sync_that_read_before_the_sink_wrote_does_not_overwrite_it(sink):
    sink.node_up("nodeX", UNDERLAY, POD_CIDR)
    ipc = sink.dp.maps["ipcache"]
    stale = list(ipc.items())  # POD is not there yet
    sink.ipcache_set(POD, 4711, UNDERLAY)
    # the agent lists other nodes' pods too (its proxy resolves identities from the same view)
    ipcache.sync(_StaleView(ipc, stale), {**_local_entries(sink.dp), POD: 4711})
    assert ipcache.entry(ipc, POD) == (4711, UNDERLAY)


POD_CIDR6, POD6 = "fd00:248:5::/64", "fd00:248:5::7/128"


def test_a_dual_stack_node_goes_into_ipcache6_with_its_ipv4_tunnel_endpoint(sink):
    """IPv6 pods ride VXLAN over the IPv4 underlay: their ipcache6 entries carry the node's IPv4
    address, and node_down clears both families."""
    sink.node_up("nodeX", UNDERLAY, POD_CIDR, POD_CIDR6)
    sink.ipcache_set(POD6, 4711, UNDERLAY)
    ipc6 = sink.dp.maps["ipcache6"]
    assert ipcache.entry(ipc6, POD6) == (4711, UNDERLAY)
    assert ipcache.entry(ipc6, POD_CIDR6) == (structs.IDENTITY_WORLD_IPV6, UNDERLAY)
    assert ipcache.entry(ipc6, "fd00:248:5::1/128") == (structs.IDENTITY_REMOTE_NODE, UNDERLAY)
    assert sink.dp.ipcache_lookup("fd00:248:5::7") == 4711
    sink.ipcache_delete(POD6)
    assert POD6 not in ipcache.remote_entries(ipc6)
    sink.ipcache_set(POD6, 4711, UNDERLAY)
    sink.node_down("nodeX")
    assert ipcache.remote_entries(ipc6) == {}
    assert ipcache.remote_entries(sink.dp.maps["ipcache"]) == {}
