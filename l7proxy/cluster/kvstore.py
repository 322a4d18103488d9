"""The cluster's key-value store: a small async interface, and etcd behind it (aetcd).

Everything the cluster layer needs from a store is here: reads, puts and deletes, one kind of
transaction (compare create/mod revision or value, then put/delete), leases, and prefix watches
that start from a revision. The rest of `l7proxy/cluster/` talks only to `KVStore`, so etcd's
client library stays in this one module. Every failure to reach the store is `KVStoreDown`,
with the address, so callers can say plainly that the kvstore is unreachable.

Why aetcd: it is asyncio-native (the agent is one event loop; etcd3 is thread/blocking and needs
the pure-Python protobuf implementation here), maintained (1.0, 2026), and speaks etcd's v3 gRPC
API including transactions, leases and watches with a start revision.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

OP_TIMEOUT_S = 2.0  # one request; a down etcd fails this fast instead of hanging a command
LIST_PAGE = 5000  # keys per range request when listing a prefix


class KVStoreDown(Exception):
    """The store cannot be reached (or did not answer in time)."""


class WatchCompacted(Exception):
    """The watch's start revision was compacted away: the caller must list again."""

    def __init__(self, revision: int) -> None:
        super().__init__(f"revision compacted up to {revision}")
        self.revision = revision


@dataclass(frozen=True, slots=True)
class Item:
    key: str
    value: str
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Compare:
    key: str
    target: str  # "create" | "mod" | "value"
    equal: bool  # == when True, != when False
    value: int | str


@dataclass(frozen=True, slots=True)
class Op:
    kind: str  # "put" | "delete"
    key: str
    value: str = ""
    lease: int | None = None


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str  # "put" | "delete"
    key: str
    value: str
    revision: int


def put(key: str, value: str, lease: int | None = None) -> Op:
    return Op("put", key, value, lease)


def delete(key: str) -> Op:
    return Op("delete", key)


def created(key: str) -> Compare:
    """True when the key exists."""
    return Compare(key, "create", False, 0)


def absent(key: str) -> Compare:
    return Compare(key, "create", True, 0)


class KVStore(Protocol):
    url: str

    async def get(self, key: str) -> Item | None: ...
    async def list(self, prefix: str) -> tuple[list[Item], int]: ...
    async def put(self, key: str, value: str, lease: int | None = None) -> int: ...
    async def delete(self, key: str) -> bool: ...
    async def txn(self, compare: list[Compare], success: list[Op]) -> bool: ...
    async def lease_grant(self, ttl: int) -> int: ...
    async def lease_keepalive(self, lease: int) -> int: ...
    async def lease_revoke(self, lease: int) -> None: ...
    def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]: ...
    async def close(self) -> None: ...


def parse_url(url: str) -> list[tuple[str, int]]:
    """`etcd://HOST:PORT[,HOST:PORT...]` -> [(host, port)]; ValueError says what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme != "etcd" or not rest:
        raise ValueError(
            f"{url!r}: give etcd://HOST:PORT[,HOST:PORT...] (e.g. etcd://10.0.0.1:2379)"
        )
    out = []
    for part in rest.rstrip("/").split(","):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{url!r}: {part!r} is not HOST:PORT (e.g. 10.0.0.1:2379)")
        out.append((host, int(port)))
    if len(out) > 1 and not all(_is_ipv4(h) for h, _ in out):
        raise ValueError(f"{url!r}: several endpoints must all be IPv4 addresses")
    return out


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False


class EtcdKV:
    """`KVStore` over etcd's v3 API. One gRPC channel; with several endpoints the channel's
    target is gRPC's `ipv4:` address list, so it fails over between them by itself."""

    def __init__(self, url: str, timeout: float = OP_TIMEOUT_S) -> None:
        # The agent forks (pyroute2's netns helpers) while gRPC's threads run; gRPC's fork
        # handlers then abort the child ("Check failed: next_worker->state == KICKED"). The
        # children never use gRPC, so the handlers are turned off before gRPC is loaded.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        import aetcd
        import grpc

        self.url = url
        self.timeout = timeout
        endpoints = parse_url(url)
        if len(endpoints) == 1:
            host, port = endpoints[0]
        else:  # "ipv4:a:2379,b:2379" once aetcd appends the last port
            host = "ipv4:" + ",".join(f"{h}:{p}" for h, p in endpoints[:-1]) + ","
            host += endpoints[-1][0]
            port = endpoints[-1][1]
        self._target = (host, port)
        self._client = aetcd.Client(host, port, timeout=timeout)
        self._aetcd = aetcd
        self._rpc_error = grpc.RpcError  # raw calls (paged list) are not wrapped by aetcd

    async def _call(self, coro):
        try:
            return await asyncio.wait_for(coro, self.timeout + 0.5)
        except (TimeoutError, self._aetcd.ClientError, OSError, self._rpc_error) as exc:
            raise KVStoreDown(f"etcd at {self.url} is unreachable ({type(exc).__name__})") from None

    async def get(self, key: str) -> Item | None:
        got = await self._call(self._client.get(key.encode()))
        return _item(got) if got is not None else None

    async def list(self, prefix: str) -> tuple[list[Item], int]:
        """Every key under `prefix` at one revision, read in pages of LIST_PAGE keys (one
        answer for 50,000 ipcache entries would pass gRPC's 4 MiB message limit)."""
        from aetcd import rpc, utils

        await self._call(self._client.connect())
        start, end = prefix.encode(), utils.prefix_range_end(prefix.encode())
        items: list[Item] = []
        revision = 0
        while True:
            request = rpc.RangeRequest(key=start, range_end=end, limit=LIST_PAGE, revision=revision)
            got = await self._call(
                self._client.kvstub.Range(
                    request, timeout=self.timeout, metadata=self._client.metadata
                )
            )
            revision = revision or int(got.header.revision)  # later pages read the same snapshot
            items.extend(_item(kv) for kv in got.kvs)
            if not got.more or not got.kvs:
                return items, revision
            start = got.kvs[-1].key + b"\0"

    async def put(self, key: str, value: str, lease: int | None = None) -> int:
        done = await self._call(self._client.put(key.encode(), value.encode(), lease=lease))
        return int(done.header.revision)

    async def delete(self, key: str) -> bool:
        done = await self._call(self._client.delete(key.encode()))
        return bool(done and done.deleted)

    async def txn(self, compare: list[Compare], success: list[Op]) -> bool:
        t = self._client.transactions
        cmps = []
        for c in compare:
            target = {"create": t.create, "mod": t.mod, "value": t.value}[c.target](c.key.encode())
            value = c.value.encode() if isinstance(c.value, str) else c.value
            cmps.append((target == value) if c.equal else (target != value))
        ops = [
            t.put(o.key.encode(), o.value.encode(), lease=o.lease)
            if o.kind == "put"
            else t.delete(o.key.encode())
            for o in success
        ]
        ok, _ = await self._call(self._client.transaction(compare=cmps, success=ops, failure=[]))
        return bool(ok)

    async def lease_grant(self, ttl: int) -> int:
        lease = await self._call(self._client.lease(ttl))
        return int(lease.id)

    async def lease_keepalive(self, lease: int) -> int:
        """The lease's TTL after the refresh; 0 when the lease is gone."""
        reply = await self._call(self._client.refresh_lease(lease))
        return int(reply.TTL) if reply is not None else 0

    async def lease_revoke(self, lease: int) -> None:
        await self._call(self._client.revoke_lease(lease))

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[WatchEvent]:
        """Events under `prefix` from `start_revision` on (inclusive). Ends by raising
        `KVStoreDown` when the connection drops, `WatchCompacted` when etcd compacted past it.

        Each watch has a client (gRPC channel) of its own, made afresh on every call: aetcd
        multiplexes watches over one stream, and after etcd restarted, watches re-created on
        that client sometimes never delivered an event again."""
        aetcd = self._aetcd
        client = aetcd.Client(*self._target, timeout=self.timeout)
        try:
            try:
                stream = await asyncio.wait_for(
                    client.watch_prefix(prefix.encode(), start_revision=start_revision),
                    self.timeout + 0.5,
                )
            except aetcd.RevisionCompactedError as exc:
                raise WatchCompacted(exc.compacted_revision) from None
            except (TimeoutError, aetcd.ClientError, OSError, self._rpc_error) as exc:
                raise KVStoreDown(f"etcd at {self.url}: no watch ({type(exc).__name__})") from None
            try:
                async for ev in stream:
                    kv = ev.kv
                    kind = "put" if ev.kind == aetcd.EventKind.PUT else "delete"
                    yield WatchEvent(kind, kv.key.decode(), kv.value.decode(), int(kv.mod_revision))
            except aetcd.RevisionCompactedError as exc:
                raise WatchCompacted(exc.compacted_revision) from None
            except (aetcd.ClientError, OSError, self._rpc_error) as exc:
                raise KVStoreDown(
                    f"etcd at {self.url}: watch ended ({type(exc).__name__})"
                ) from None
        finally:
            with _suppress():
                await asyncio.wait_for(client.close(), 2.0)

    async def close(self) -> None:
        with _suppress():
            await asyncio.wait_for(self._client.close(), 2.0)


def _suppress():
    import contextlib

    return contextlib.suppress(Exception)


def _item(kv) -> Item:
    return Item(
        kv.key.decode(),
        kv.value.decode(),
        int(kv.mod_revision),
        int(kv.create_revision),
        int(kv.lease),
    )
