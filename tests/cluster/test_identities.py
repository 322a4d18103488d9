"""The identity allocator's transactions against a real etcd: one id per label set, also when
nodes race; never one id for two label sets; leased references; two-round GC."""

from __future__ import annotations

import asyncio

from l7proxy.cluster import keys
from l7proxy.cluster.identities import FIRST_ID, ClusterIdentities, GcState
from l7proxy.cluster.kvstore import EtcdKV
from tests.cluster.conftest import run, wipe

WEB = keys.labels_key(["k8s:app=web", "k8s:io.kubernetes.pod.namespace=default"])
DB = keys.labels_key(["k8s:app=db", "k8s:io.kubernetes.pod.namespace=default"])


async def _nodes(url: str, n: int):
    await wipe(url)
    out = []
    for i in range(n):
        kv = EtcdKV(url)
        out.append((ClusterIdentities(kv, f"node{i + 1}"), await kv.lease_grant(30)))
    return out


async def _close(nodes):
    for ids, _ in nodes:
        await ids.kv.close()


def test_same_labels_on_two_nodes_at_once_get_one_id(etcd):
    async def main():
        nodes = await _nodes(etcd.url, 2)
        try:
            # 10 rounds of both nodes allocating the same new label set at the same moment
            for i in range(10):
                labels = keys.labels_key([f"k8s:app=race{i}"])
                a, b = await asyncio.gather(*(ids.allocate(labels, lease) for ids, lease in nodes))
                assert a == b
            kv = nodes[0][0].kv
            masters, _ = await kv.list(keys.IDENTITY_ID)
            assert len(masters) == 10
            refs, _ = await kv.list(keys.IDENTITY_VALUE)
            assert len(refs) == 20  # one leased reference per node and label set
            assert all(r.lease != 0 for r in refs)
        finally:
            await _close(nodes)

    run(main())


def test_different_label_sets_racing_never_share_an_id(etcd):
    async def main():
        nodes = await _nodes(etcd.url, 3)
        try:
            jobs = []
            for i in range(8):
                for ids, lease in nodes:  # every node allocates every label set, interleaved
                    jobs.append(
                        (
                            keys.labels_key([f"k8s:app=s{i}"]),
                            ids.allocate(keys.labels_key([f"k8s:app=s{i}"]), lease),
                        )
                    )
            got = await asyncio.gather(*(job for _, job in jobs))
            by_labels: dict[str, set[int]] = {}
            for (labels, _), number in zip(jobs, got, strict=True):
                by_labels.setdefault(labels, set()).add(number)
            assert all(len(v) == 1 for v in by_labels.values())  # one id per label set
            numbers = [next(iter(v)) for v in by_labels.values()]
            assert len(set(numbers)) == 8  # no two label sets share one
            assert min(numbers) >= FIRST_ID  # reserved identities (1..255) are never handed out
        finally:
            await _close(nodes)

    run(main())


def test_gc_deletes_an_id_only_after_two_rounds_without_references(etcd):
    async def main():
        nodes = await _nodes(etcd.url, 2)
        (a, lease_a), (b, lease_b) = nodes
        try:
            web = await a.allocate(WEB, lease_a)
            db = await a.allocate(DB, lease_a)
            assert await b.allocate(DB, lease_b) == db
            await a.release(WEB)
            await a.release(DB)  # b still holds db
            state = GcState()
            assert await a.gc(state) == []  # round 1 only marks
            assert await a.gc(state) == [web]  # round 2 sweeps the unreferenced one
            assert await a.kv.get(keys.identity_id(db)) is not None
            assert await a.kv.get(keys.identity_labels(WEB)) is None
            # web's labels come back: a new id (web's number is free again)
            assert await b.allocate(WEB, lease_b) == web
        finally:
            await _close(nodes)

    run(main())


def test_a_reference_taken_between_gc_rounds_keeps_the_id(etcd):
    async def main():
        nodes = await _nodes(etcd.url, 2)
        (a, lease_a), (b, lease_b) = nodes
        try:
            web = await a.allocate(WEB, lease_a)
            await a.release(WEB)
            state = GcState()
            assert await a.gc(state) == []
            assert await b.allocate(WEB, lease_b) == web  # between the rounds
            await b.release(WEB)  # unreferenced again, but its index moved: not this round
            assert await a.gc(state) == []
            assert await a.kv.get(keys.identity_id(web)) is not None
        finally:
            await _close(nodes)

    run(main())


def test_references_go_with_the_nodes_lease(etcd):
    async def main():
        nodes = await _nodes(etcd.url, 1)
        ((a, lease),) = nodes
        try:
            web = await a.allocate(WEB, lease)
            await a.kv.lease_revoke(lease)  # what an expired lease does
            refs, _ = await a.kv.list(keys.IDENTITY_VALUE)
            assert refs == []
            state = GcState()
            await a.gc(state)
            assert await a.gc(state) == [web]
        finally:
            await _close(nodes)

    run(main())
