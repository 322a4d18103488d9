"""Two nodes' cluster links against a real etcd: registration, pod CIDRs, the ipcache, node
expiry, an etcd outage (cached state, fail-fast writes, waiting allocations, resumed watches)
and a restart that takes its lease and CIDR back."""

from __future__ import annotations

import asyncio
import time

import pytest

from l7proxy.cluster import keys
from l7proxy.cluster.kvstore import EtcdKV, KVStoreDown
from l7proxy.cluster.link import ClusterLink, LinkConfig, Owner
from l7proxy.cluster.records import PolicySet
from l7proxy.cluster.sink import RecordingSink
from tests.cluster.conftest import run, wipe

WEB = keys.labels_key(["k8s:app=web"])
NEW = keys.labels_key(["k8s:app=new"])


class RecordingOwner(Owner):
    def __init__(self) -> None:
        self.policies: list[PolicySet] = []
        self.ipcache_changes = 0

    async def cluster_identities_changed(self) -> None:
        pass

    async def cluster_ipcache_changed(self) -> None:
        self.ipcache_changes += 1

    async def cluster_policy_changed(self, policy: PolicySet) -> None:
        self.policies.append(policy)


def _link(url: str, name: str, ip: str, ttl: int = 3, saved: dict | None = None):
    config = LinkConfig(
        url=url, node=name, cluster_cidr="10.252.0.0/16", underlay_ip=ip, lease_ttl=ttl
    )
    box = {"saved": dict(saved or {})}
    link = ClusterLink(
        config,
        EtcdKV(url),
        RecordingSink(),
        RecordingOwner(),
        box["saved"],
        lambda saved: box.__setitem__("saved", dict(saved)),
    )
    link.box = box
    return link


async def until(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def kill(link: ClusterLink) -> None:
    """Like SIGKILL: tasks stop, nothing is revoked or deleted."""
    for task in link._tasks:
        task.cancel()
    await asyncio.gather(*link._tasks, return_exceptions=True)
    await link.kv.close()


def test_nodes_see_each_other_and_each_others_pods(etcd):
    async def main():
        await wipe(etcd.url)
        a, b = _link(etcd.url, "node1", "192.0.2.1"), _link(etcd.url, "node2", "192.0.2.2")
        await a.start()
        await b.start()
        try:
            assert a.pod_cidr != b.pod_cidr
            assert a.pod_cidr.endswith("/24") and b.pod_cidr.startswith("10.252.")
            await until(lambda: "node2" in a.sink.nodes)
            assert b.sink.nodes["node1"] == ("192.0.2.1", a.pod_cidr)
            number = await a.identity_for(WEB)
            assert await b.identity_for(WEB) == number
            await a.endpoint_added("10.252.0.5", number)
            await until(lambda: "10.252.0.5/32" in b.sink.ipcache)
            assert b.sink.ipcache["10.252.0.5/32"] == (number, "192.0.2.1")
            assert "10.252.0.5/32" not in a.sink.ipcache  # a node never gets its own pods
            await a.endpoint_removed("10.252.0.5", WEB, still_used=False)
            await until(lambda: "10.252.0.5/32" not in b.sink.ipcache)
        finally:
            await a.close()
            await b.close()

    run(main())


def test_a_node_whose_lease_expires_is_removed_everywhere(etcd):
    async def main():
        await wipe(etcd.url)
        a, b = _link(etcd.url, "node1", "192.0.2.1", ttl=2), _link(etcd.url, "node2", "192.0.2.2")
        await a.start()
        await b.start()
        try:
            await a.endpoint_added("10.252.0.7", await a.identity_for(WEB))
            await until(lambda: "10.252.0.7/32" in b.sink.ipcache)
            t0 = time.monotonic()
            await kill(a)
            await until(lambda: "node1" not in b.sink.nodes, timeout=15)
            gone_after = time.monotonic() - t0
            assert "10.252.0.7/32" not in b.sink.ipcache
            assert ("node_down", "node1") in b.sink.calls
            assert 1.0 < gone_after < 10.0  # the TTL (2 s) decides, not a poll of minutes
        finally:
            await b.close()

    run(main())


def test_etcd_outage_keeps_cache_fails_writes_fast_and_heals(etcd):
    async def main():
        await wipe(etcd.url)
        a, b = (
            _link(etcd.url, "node1", "192.0.2.1", ttl=10),
            _link(etcd.url, "node2", "192.0.2.2", ttl=10),
        )
        await a.start()
        await b.start()
        try:
            web = await a.identity_for(WEB)
            await a.endpoint_added("10.252.0.8", web)
            await until(lambda: "10.252.0.8/32" in b.sink.ipcache)
            # the identity comes by its own watch, not with the ipcache entry (CI saw it late)
            await until(lambda: b.identities.by_labels.get(WEB) == web)
            etcd.stop()
            # a write notices at once; the keepalive loop notices within a third of the TTL
            t0 = time.monotonic()
            with pytest.raises(KVStoreDown):
                await a.kv.put("l7proxy/probe", "x")
            assert time.monotonic() - t0 < 3.5
            await until(lambda: not a.reachable, timeout=8)
            t0 = time.monotonic()
            with pytest.raises(KVStoreDown, match="unreachable"):
                await a.publish_policy(PolicySet(1, ()))
            assert time.monotonic() - t0 < 0.5  # refused at once, not after a timeout
            # cached state stays: remote pods, nodes, identities
            assert b.sink.ipcache["10.252.0.8/32"] == (web, "192.0.2.1")
            assert "node1" in b.sink.nodes
            # known labels answer from the cache; new labels wait for etcd
            assert await asyncio.wait_for(b.identity_for(WEB), 4.0) == web
            waiting = asyncio.create_task(b.identity_for(NEW))
            await asyncio.sleep(1.0)
            assert not waiting.done() and NEW in b.waiting
            await b.endpoint_added("10.252.1.9", web)  # written when etcd is back
            etcd.start()
            new = await asyncio.wait_for(waiting, 20)
            assert new not in (web, None) and NEW not in b.waiting
            await until(lambda: a.reachable and b.reachable, timeout=10)
            await until(lambda: "10.252.1.9/32" in a.sink.ipcache, timeout=10)
            assert a.sink.ipcache["10.252.1.9/32"] == (web, "192.0.2.2")
            # the watches resumed from their revision: no full re-list was needed
            assert all(w.resumes >= 1 for w in a.watches.values())
            assert all(w.relists == 0 for w in a.watches.values())
        finally:
            if etcd.proc.poll() is not None:
                etcd.start()
            await a.close()
            await b.close()

    run(main())


def test_a_restarted_node_takes_back_its_lease_cidr_and_identities(etcd):
    async def main():
        await wipe(etcd.url)
        a = _link(etcd.url, "node1", "192.0.2.1", ttl=15)
        b = _link(etcd.url, "node2", "192.0.2.2")
        await a.start()
        await b.start()
        links = [b]
        try:
            web = await a.identity_for(WEB)
            await a.endpoint_added("10.252.0.9", web)
            await until(lambda: "10.252.0.9/32" in b.sink.ipcache)
            lease, cidr = a.lease, a.pod_cidr
            await kill(a)
            calls_before = len(b.sink.calls)
            again = _link(etcd.url, "node1", "192.0.2.1", ttl=15, saved=a.box["saved"])
            await again.start()
            links.append(again)
            assert (again.lease, again.pod_cidr) == (lease, cidr)
            again.my_refs[WEB] = web
            assert await again.identity_for(WEB) == web
            await again.endpoint_added("10.252.0.9", web)
            await asyncio.sleep(0.5)
            # node2 saw no node or pod go away and come back
            assert not any(
                c[0] in ("node_down", "ipcache_delete") for c in b.sink.calls[calls_before:]
            )
            await again.close()
        finally:
            await b.close()

    run(main())


def test_an_identity_deleted_while_in_use_is_put_back(etcd):
    async def main():
        await wipe(etcd.url)
        a = _link(etcd.url, "node1", "192.0.2.1", ttl=6)
        await a.start()
        try:
            web = await a.identity_for(WEB)
            kv = EtcdKV(etcd.url)
            await kv.delete(keys.identity_id(web))
            await kv.delete(keys.identity_labels(WEB))

            async def back():
                got = await kv.get(keys.identity_id(web))
                return got is not None and got.value == WEB

            deadline = time.monotonic() + 10
            while not await back():
                assert time.monotonic() < deadline, "identity not re-created"
                await asyncio.sleep(0.1)
            index = await kv.get(keys.identity_labels(WEB))
            assert index is not None and index.value == str(web)
            await kv.close()
        finally:
            await a.close()

    run(main())
