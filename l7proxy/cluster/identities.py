"""Cluster-wide identity allocation by label set, with etcd transactions.

Keys (keys.py): the master key `id/<N>` holds the labels; `labels/<labels>` holds N and makes
the label set unique; each node that uses the identity holds a leased reference
`value/<labels>/<node>`. Cilium's agents can race and give one label set two ids (it relies on
its operator to clean up); the `labels/` index closes that: creating an id is one transaction
that requires both `id/<N>` and `labels/<labels>` to be absent, so of two nodes allocating the
same labels at once exactly one creates the id and the other finds it on its retry.

Taking a reference to an existing id is also one transaction: it requires the index to still
name N and the master key to exist, and it re-puts the index, which bumps the index's
mod revision. Garbage collection (two rounds, like Cilium's operator) deletes an id only if it
had no references in both rounds and its index's mod revision did not move in between, so an id
that gained a reference meanwhile is never deleted under the node that took it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from l7proxy.cluster import keys
from l7proxy.cluster.kvstore import Compare, KVStore, KVStoreDown, absent, created, put
from l7proxy.cluster.kvstore import delete as delete_op

log = logging.getLogger("l7proxy.cluster")

FIRST_ID = 256  # Cilium's first cluster-scope identity; 1..255 are reserved
LAST_ID = 65535  # cluster-local range (Cilium puts the cluster id above bit 16)
MAX_ATTEMPTS = 16  # Cilium's maxAllocAttempts
BACKOFF_S = 0.02  # first retry delay, doubled each time (Cilium: 20 ms, factor 2)


class IdentitySpaceFull(Exception):
    pass


@dataclass
class GcState:
    """What the previous GC round saw: id -> the index's mod revision while unreferenced."""

    stale: dict[int, int] = field(default_factory=dict)


class ClusterIdentities:
    """One node's view: allocate/release references, and the cache of every id in etcd."""

    def __init__(self, kv: KVStore, node: str) -> None:
        self.kv = kv
        self.node = node
        self.by_labels: dict[str, int] = {}  # labels key -> id, every id the node has seen
        self.by_id: dict[int, str] = {}

    def learn(self, number: int, labels: str) -> None:
        old = self.by_id.get(number)
        if old is not None and old != labels:
            self.by_labels.pop(old, None)
        self.by_id[number] = labels
        self.by_labels[labels] = number

    def forget(self, number: int) -> None:
        labels = self.by_id.pop(number, None)
        if labels is not None and self.by_labels.get(labels) == number:
            del self.by_labels[labels]

    async def load(self) -> int:
        """Read every master key; returns the revision to watch `id/` from."""
        items, revision = await self.kv.list(keys.IDENTITY_ID)
        for item in items:
            number = _number(item.key)
            if number is not None:
                self.learn(number, item.value)
        return revision

    async def allocate(self, labels: str, lease: int) -> int:
        """The id of `labels` (a labels key), taking this node's leased reference to it."""
        delay = BACKOFF_S
        for _ in range(MAX_ATTEMPTS):
            index = await self.kv.get(keys.identity_labels(labels))
            if index is not None:
                number = int(index.value)
                if await self._reference(labels, number, lease):
                    self.learn(number, labels)
                    return number
            else:
                number = await self._free_id()
                if await self._create(labels, number, lease):
                    self.learn(number, labels)
                    return number
            await asyncio.sleep(delay)
            delay *= 2
        raise KVStoreDown(f"could not allocate an identity for {labels} in {MAX_ATTEMPTS} tries")

    async def reference(self, labels: str, number: int, lease: int) -> bool:
        """Re-take this node's reference to an id it already uses (after a restart or a new
        lease). False if the id is gone from etcd (then allocate again)."""
        return await self._reference(labels, number, lease)

    async def recreate(self, labels: str, number: int, lease: int) -> bool:
        """Put back an id this node still uses after it vanished from etcd, with its number;
        False if that number or these labels now belong to another id."""
        return await self._create(labels, number, lease)

    async def _reference(self, labels: str, number: int, lease: int) -> bool:
        index = keys.identity_labels(labels)
        return await self.kv.txn(
            [Compare(index, "value", True, str(number)), created(keys.identity_id(number))],
            [
                put(index, str(number)),
                put(keys.identity_value(labels, self.node), str(number), lease),
            ],
        )

    async def _create(self, labels: str, number: int, lease: int) -> bool:
        master, index = keys.identity_id(number), keys.identity_labels(labels)
        return await self.kv.txn(
            [absent(master), absent(index)],
            [
                put(master, labels),
                put(index, str(number)),
                put(keys.identity_value(labels, self.node), str(number), lease),
            ],
        )

    async def _free_id(self) -> int:
        items, _ = await self.kv.list(keys.IDENTITY_ID)
        used = {n for n in (_number(i.key) for i in items) if n is not None}
        for number in range(FIRST_ID, LAST_ID + 1):
            if number not in used:
                return number
        raise IdentitySpaceFull(f"all {LAST_ID - FIRST_ID + 1} cluster identities are in use")

    async def release(self, labels: str) -> None:
        """Drop this node's reference; the id itself goes only through GC."""
        await self.kv.delete(keys.identity_value(labels, self.node))

    async def gc(self, state: GcState) -> list[int]:
        """One mark-and-sweep round; returns the ids deleted in this round."""
        masters, _ = await self.kv.list(keys.IDENTITY_ID)
        refs, _ = await self.kv.list(keys.IDENTITY_VALUE)
        referenced = set()
        for item in refs:
            labels, _, _node = item.key[len(keys.IDENTITY_VALUE) :].rpartition("/")
            referenced.add(labels)
        deleted, stale = [], {}
        for item in masters:
            number = _number(item.key)
            if number is None or item.value in referenced:
                continue
            index = await self.kv.get(keys.identity_labels(item.value))
            index_rev = index.mod_revision if index is not None else 0
            if state.stale.get(number) == index_rev:
                ops = [delete_op(item.key)]
                cmps = [Compare(item.key, "mod", True, item.mod_revision)]
                if index is not None and index.value == str(number):
                    ops.append(delete_op(index.key))
                    cmps.append(Compare(index.key, "mod", True, index_rev))
                if await self.kv.txn(cmps, ops):
                    deleted.append(number)
                    log.info("identity %d (%s) had no references: deleted", number, item.value)
            else:
                stale[number] = index_rev
        state.stale = stale
        return deleted


def _number(key: str) -> int | None:
    tail = key.rpartition("/")[2]
    return int(tail) if tail.isdigit() else None
