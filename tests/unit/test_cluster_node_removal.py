"""A node's lease expires: etcd deletes its node record and its pods' ipcache entries in one
revision, and two watches (nodes, ipcache) bring the deletes at the same time. Whatever the
interleaving, the node's tunnel endpoint and routes go (node_down) and its pods leave the
ipcache; a pod of the node's next life that the ipcache watch already brought stays. No etcd
here: the handlers are driven directly, with a sink whose calls take a moment (as the real one
does, in a thread) so the two handlers interleave at every await."""

from __future__ import annotations

import asyncio

from l7proxy.cluster import keys
from l7proxy.cluster.kvstore import WatchEvent
from l7proxy.cluster.link import ClusterLink, LinkConfig, Owner
from l7proxy.cluster.records import IPEntry, NodeRecord
from l7proxy.cluster.sink import RecordingSink
from l7proxy.cluster.watch import ResumableWatch


class SlowSink(RecordingSink):
    def ipcache_delete(self, cidr: str) -> None:
        import time

        time.sleep(0.01)
        super().ipcache_delete(cidr)


class CountingOwner(Owner):
    changes = 0

    async def cluster_ipcache_changed(self) -> None:
        self.changes += 1


def _link() -> ClusterLink:
    config = LinkConfig(url="etcd://127.0.0.1:1", node="node1", cluster_cidr="10.252.0.0/16")
    return ClusterLink(config, kv=None, sink=SlowSink(), owner=CountingOwner(), saved={},
                       save=lambda saved: None)  # fmt: skip


def _node_put(name: str, ip: str, cidr: str, rev: int) -> WatchEvent:
    return WatchEvent("put", keys.node(name), NodeRecord(name, ip, cidr, "tunnel", 1).dumps(), rev)


def _ip_put(ip: str, node: str, host: str, rev: int, identity: int = 300) -> WatchEvent:
    return WatchEvent("put", keys.ipcache(ip), IPEntry(ip, identity, host, node).dumps(), rev)


def _joined(link: ClusterLink, pods: list[str]) -> None:
    async def go():
        await link._on_node(_node_put("node3", "10.251.0.13", "10.252.2.0/24", 10))
        for i, ip in enumerate(pods):
            await link._on_ip(_ip_put(ip, "node3", "10.251.0.13", 11 + i))

    asyncio.run(go())


def test_lease_expiry_seen_by_both_watches_at_once_removes_the_node():
    link = _link()
    pods = [f"10.252.2.{i}" for i in range(2, 8)]
    _joined(link, pods)
    expired = 50  # the revision of the lease's deletes

    async def both():
        node_gone = link._on_node(WatchEvent("delete", keys.node("node3"), "", expired))

        async def ips_gone():
            for ip in pods:
                await link._on_ip(WatchEvent("delete", keys.ipcache(ip), "", expired))

        await asyncio.gather(node_gone, ips_gone())

    asyncio.run(both())
    assert ("node_down", "node3") in link.sink.calls
    assert link.sink.nodes == {} and link.sink.ipcache == {}
    assert link.remote_ips == {} and link.nodes == {}


def test_a_pod_of_the_node_s_next_life_survives_the_old_life_s_delete():
    """node3 restarted after its lease ran out: the ipcache watch brought its pod's new entry
    (revision 60) before the nodes watch brought the old record's delete (revision 50)."""
    link = _link()
    _joined(link, ["10.252.2.2"])

    async def go():
        await link._on_ip(_ip_put("10.252.2.2", "node3", "10.251.0.13", 60, identity=301))
        await link._on_node(WatchEvent("delete", keys.node("node3"), "", 50))
        await link._on_node(_node_put("node3", "10.251.0.13", "10.252.2.0/24", 61))

    asyncio.run(go())
    assert link.remote_ips["10.252.2.2"].identity == 301
    assert link.sink.ipcache["10.252.2.2/32"] == (301, "10.251.0.13")
    calls = [c[0] for c in link.sink.calls]
    assert calls[-3:] == ["node_down", "ipcache_set", "node_up"]


def test_a_handler_that_raises_does_not_end_the_watch():
    seen: list[str] = []

    async def on_event(ev: WatchEvent) -> None:
        if ev.key == "bad":
            raise KeyError(ev.key)
        seen.append(ev.key)

    class OneStream:
        async def watch(self, prefix, start):
            for i, key in enumerate(("a", "bad", "b"), start=start):
                yield WatchEvent("put", key, "", i)
            await asyncio.Event().wait()  # stays open, like a quiet etcd

    async def go():
        watch = ResumableWatch(OneStream(), "p/", on_event, on_relist=None)
        task = asyncio.create_task(watch.run(5))
        await asyncio.sleep(0.05)
        task.cancel()
        return watch

    watch = asyncio.run(go())
    assert seen == ["a", "b"] and watch.handler_errors == 1 and watch.next_revision == 8
