"""One agent's link to the cluster: its lease, its own keys, and the watches on everyone else's.

The link keeps what this node wants in etcd (its node record, pod CIDR, identity references and
ipcache entries) and writes it again whenever etcd comes back or the lease had to be renewed, so
an outage or a lost lease heals without a restart. What other nodes publish arrives through
resumable watches and goes to the datapath through the sink and to the agent through `Owner`.
While etcd is unreachable nothing cached is dropped: every verdict keeps working.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

from l7proxy.cluster import ipam, keys
from l7proxy.cluster.identities import ClusterIdentities, GcState
from l7proxy.cluster.kvstore import Compare, Item, KVStore, KVStoreDown, WatchEvent, put
from l7proxy.cluster.records import IPEntry, NodeRecord, PolicySet
from l7proxy.cluster.sink import ClusterSink
from l7proxy.cluster.status import link_status
from l7proxy.cluster.watch import ResumableWatch

log = logging.getLogger("l7proxy.cluster")

WAIT_LOG_S = 5.0  # how often a waiting allocation says so again


@dataclass(frozen=True)
class LinkConfig:
    url: str
    node: str
    cluster_cidr: str
    mask_size: int = 24
    routing: str = "tunnel"
    underlay_ip: str = ""
    lease_ttl: int = 15
    gc_interval: float = 60.0
    start_timeout: float = 60.0
    cluster_cidr6: str = ""  # dual stack: an IPv6 pod CIDR per node too
    mask_size6: int = 64
    underlay_ip6: str = ""  # published for native routing's IPv6 routes


def host_prefix(ip: str) -> str:
    """An address as the ipcache's host prefix: /32, or /128 for IPv6."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


class Owner:
    """What the agent does when the cluster changes (all called on the event loop)."""

    async def cluster_identities_changed(self) -> None: ...
    async def cluster_ipcache_changed(self) -> None: ...
    async def cluster_policy_changed(self, policy: PolicySet) -> None: ...


class ClusterLink:
    def __init__(
        self,
        config: LinkConfig,
        kv: KVStore,
        sink: ClusterSink,
        owner: Owner,
        saved: dict,
        save: Callable[[dict], None],
    ) -> None:
        self.config = config
        self.kv = kv
        self.sink = sink
        self.owner = owner
        self.saved = dict(saved)  # {"lease", "pod_cidr", "pod_cidr6"} from the agent's store
        self._save = save
        self.identities = ClusterIdentities(kv, config.node)
        self.lease = 0
        self.pod_cidr = ""
        self.pod_cidr6 = ""
        self.record: NodeRecord | None = None
        self.my_ips: dict[str, IPEntry] = {}  # address -> its key's value (two for dual stack)
        self.my_endpoints: set[str] = set()  # each local endpoint by its first address
        self.my_refs: dict[str, int] = {}  # labels key -> id this node references
        self.remote_ips: dict[str, IPEntry] = {}
        self.remote_revs: dict[str, int] = {}  # ip -> etcd revision of its latest put
        self.nodes: dict[str, NodeRecord] = {}
        self.policy: PolicySet | None = None
        self.policy_mod = 0  # mod revision of the policy key (0: no policy stored yet)
        self.reachable = False
        self.down_since: float | None = None
        self.dirty = False  # a write failed: write everything again when etcd is back
        self.waiting: dict[str, float] = {}  # labels waiting for an id -> since
        self.watches: dict[str, ResumableWatch] = {}
        self._tasks: list[asyncio.Task] = []
        self._gc = GcState()
        self._sink_lock = asyncio.Lock()
        self._sink_batch: list | None = None  # while joining: sink calls made in one thread hop

    # start and stop

    async def start(self) -> None:
        """Join: lease, pod CIDR, the current state of the cluster, then the watches. Retries
        while etcd is unreachable, up to `start_timeout`."""
        deadline = time.monotonic() + self.config.start_timeout
        while True:
            try:
                await self._join()
                break
            except KVStoreDown as exc:
                if time.monotonic() > deadline:
                    raise KVStoreDown(f"{exc}; gave up joining the cluster") from None
                log.warning("joining the cluster: %s; retrying", exc)
                await asyncio.sleep(1.0)
        self.reachable = True
        for name, coro in (
            ("keepalive", self._keepalive_loop()),
            ("gc", self._gc_loop()),
            *((f"watch {p}", w.run(w.next_revision)) for p, w in self.watches.items()),
        ):
            self._tasks.append(asyncio.create_task(coro, name=name))

    async def _join(self) -> None:
        self.lease = await self._lease()
        self.pod_cidr = await ipam.lease_pod_cidr(
            self.kv,
            self.config.node,
            self.config.cluster_cidr,
            self.config.mask_size,
            self.lease,
            self.saved.get("pod_cidr"),
        )
        self.pod_cidr6 = await self._lease_pod_cidr6(self.saved.get("pod_cidr6"))
        self.saved.update(lease=self.lease, pod_cidr=self.pod_cidr, pod_cidr6=self.pod_cidr6)
        self._save(self.saved)
        self.record = NodeRecord(
            self.config.node,
            self.config.underlay_ip,
            self.pod_cidr,
            self.config.routing,
            0,
            pod_cidr6=self.pod_cidr6,
            underlay_ip6=self.config.underlay_ip6,
        )
        await self.kv.put(keys.node(self.config.node), self.record.dumps(), self.lease)
        revision = await self.identities.load()
        self.watches[keys.IDENTITY_ID] = self._watch(keys.IDENTITY_ID, self._on_identity, revision)
        self._sink_batch = []
        try:
            for prefix, on_event in (
                (keys.NODES, self._on_node),
                (keys.IPCACHE, self._on_ip),
                (keys.POLICY, self._on_policy),
            ):
                items, revision = await self.kv.list(prefix)
                for item in items:
                    await on_event(WatchEvent("put", item.key, item.value, item.mod_revision))
                self.watches[prefix] = self._watch(prefix, on_event, revision)
        finally:
            batch, self._sink_batch = self._sink_batch, None
        await asyncio.to_thread(_run_all, batch)  # 50,000 entries: one hop, not 50,000

    async def _lease_pod_cidr6(self, preferred: str | None) -> str:
        c = self.config
        if not c.cluster_cidr6:
            return ""
        return await ipam.lease_pod_cidr(
            self.kv, c.node, c.cluster_cidr6, c.mask_size6, self.lease, preferred, 6
        )

    def _watch(self, prefix: str, on_event, revision: int) -> ResumableWatch:
        watch = ResumableWatch(self.kv, prefix, on_event, self._relister(prefix, on_event))
        watch.next_revision = revision + 1
        return watch

    async def _lease(self) -> int:
        """The lease saved before a restart if etcd still has it (the node's keys never
        vanish across a quick restart), else a new one."""
        old = int(self.saved.get("lease") or 0)
        if old and await self.kv.lease_keepalive(old) > 0:
            return old
        return await self.kv.lease_grant(self.config.lease_ttl)

    async def close(self) -> None:
        """Stop watching; the lease is left to run out (or to be taken back by a restart)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.kv.close()

    # what this node publishes

    async def identity_for(self, labels: str) -> int:
        """The cluster id of a labels key. Known label sets answer from the cache, also while
        etcd is down (the reference is written when it returns); new ones wait for etcd."""
        known = self.my_refs.get(labels) or self.identities.by_labels.get(labels)
        if known is not None:
            self.my_refs[labels] = known
            await self._write(self.identities.reference(labels, known, self.lease))
            return known
        since = time.monotonic()
        said = 0.0
        while True:
            try:
                number = await self.identities.allocate(labels, self.lease)
                break
            except KVStoreDown as exc:
                self.waiting[labels] = since
                if time.monotonic() - said >= WAIT_LOG_S:
                    said = time.monotonic()
                    log.warning(
                        "waiting for the kvstore to give labels %s an identity: %s", labels, exc
                    )
                await asyncio.sleep(0.5)
        self.waiting.pop(labels, None)
        self.my_refs[labels] = number
        return number

    async def endpoint_added(self, ip: str, identity: int, ip6: str = "") -> None:
        """One ipcache key per address (a dual-stack pod has two, an IPv6-only one only ip6),
        under the same prefix as Cilium keeps both families."""
        self.my_endpoints.add(ip or ip6)
        for addr in (ip, ip6):
            if not addr:
                continue
            entry = IPEntry(addr, identity, self.config.underlay_ip, self.config.node)
            self.my_ips[addr] = entry
            await self._write(self.kv.put(keys.ipcache(addr), entry.dumps(), self.lease))
        await self._publish_record(endpoints=self._endpoint_count())

    async def endpoint_removed(self, ip: str, labels: str, still_used: bool, ip6: str = "") -> None:
        self.my_endpoints.discard(ip or ip6)
        for addr in (ip, ip6):
            if addr:
                self.my_ips.pop(addr, None)
                await self._write(self.kv.delete(keys.ipcache(addr)))
        if not still_used and self.my_refs.pop(labels, None) is not None:
            await self._write(self.identities.release(labels))
        await self._publish_record(endpoints=self._endpoint_count())

    def _endpoint_count(self) -> int:
        """Endpoints, not addresses (a dual-stack pod has two keys)."""
        return len(self.my_endpoints)

    async def policy_in_force(self, revision: int, error: str = "") -> None:
        await self._publish_record(policy_revision=revision, policy_error=error)

    async def publish_policy(self, policy: PolicySet) -> None:
        """Write a new policy set, only if nobody changed it since this node saw it. Raises
        KVStoreDown when etcd is unreachable, ValueError on a concurrent change."""
        if not self.reachable:
            raise KVStoreDown(self.unreachable_reason())
        ok = await self.kv.txn(
            [Compare(keys.POLICY, "mod", True, self.policy_mod)],
            [put(keys.POLICY, policy.dumps())],
        )
        if not ok:
            raise ValueError("the cluster's policy changed during this import; run it again")

    def status(self) -> dict:
        return link_status(self)

    def unreachable_reason(self) -> str:
        since = f" for {time.monotonic() - self.down_since:.0f}s" if self.down_since else ""
        return f"etcd at {self.config.url} is unreachable{since}"

    async def _publish_record(self, **changes) -> None:
        if self.record is None:
            return
        self.record = replace(self.record, **changes)
        await self._write(self.kv.put(keys.node(self.config.node), self.record.dumps(), self.lease))

    async def _write(self, coro: Awaitable) -> None:
        try:
            result = await coro
        except KVStoreDown:
            self._mark_down()
            self.dirty = True
            return
        if result is False:  # a reference to an id that is gone: the reconcile re-creates it
            self.dirty = True

    def _mark_down(self) -> None:
        if self.reachable:
            log.warning("%s; running from cached state", self.unreachable_reason())
            self.down_since = time.monotonic()
        self.reachable = False

    # keeping the lease, writing everything again after an outage

    async def _keepalive_loop(self) -> None:
        while True:
            interval = self.config.lease_ttl / 3 if self.reachable and not self.dirty else 0.5
            await asyncio.sleep(min(interval, 5.0))
            try:
                ttl = await self.kv.lease_keepalive(self.lease)
                if ttl <= 0:
                    log.warning(
                        "lease %x expired: taking a new one and writing this node again", self.lease
                    )
                    self.lease = await self.kv.lease_grant(self.config.lease_ttl)
                    self.saved["lease"] = self.lease
                    self._save(self.saved)
                    self.dirty = True
                if self.dirty or not self.reachable:
                    await self._reconcile()
                if not self.reachable:
                    log.warning("etcd at %s is reachable again", self.config.url)
                self.reachable, self.down_since, self.dirty = True, None, False
            except KVStoreDown:
                self._mark_down()

    async def _reconcile(self) -> None:
        """Write every key this node owns (idempotent puts; raises KVStoreDown)."""
        self.pod_cidr = await ipam.lease_pod_cidr(
            self.kv, self.config.node, self.config.cluster_cidr, self.config.mask_size,
            self.lease, self.pod_cidr,
        )  # fmt: skip
        self.pod_cidr6 = await self._lease_pod_cidr6(self.pod_cidr6)
        if self.record is not None:
            await self.kv.put(keys.node(self.config.node), self.record.dumps(), self.lease)
        for labels, number in list(self.my_refs.items()):
            if not await self.identities.reference(labels, number, self.lease):
                # gone from etcd (GC after a long outage): re-create it with the same number
                if not await self.identities.recreate(labels, number, self.lease):
                    log.error("identity %d for %s was taken by other labels", number, labels)
        for ip, entry in list(self.my_ips.items()):
            await self.kv.put(keys.ipcache(ip), entry.dumps(), self.lease)

    async def _gc_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.gc_interval)
            with contextlib.suppress(KVStoreDown):
                await self.identities.gc(self._gc)

    # what other nodes publish

    async def _on_identity(self, ev: WatchEvent) -> None:
        number = int(ev.key.rpartition("/")[2] or 0)
        if ev.kind == "put":
            self.identities.learn(number, ev.value)
        elif number not in self.my_refs.values():
            self.identities.forget(number)
        else:  # deleted while this node uses it (by hand, or GC racing a lost lease): put it back
            log.warning("identity %d was deleted while in use here: re-creating it", number)
            self.dirty = True
        await self.owner.cluster_identities_changed()

    async def _on_node(self, ev: WatchEvent) -> None:
        name = ev.key[len(keys.NODES) :]
        if name == self.config.node:
            return
        if ev.kind == "put":
            record = NodeRecord.loads(ev.value)
            old = self.nodes.get(name)
            self.nodes[name] = record
            if old is None or _routing_of(old) != _routing_of(record):
                args = (record.underlay_ip, record.pod_cidr)
                if record.pod_cidr6 or record.underlay_ip6:  # a dual-stack node
                    args += (record.pod_cidr6, record.underlay_ip6)
                await self._sink(self.sink.node_up, name, *args)
            return
        if self.nodes.pop(name, None) is None:
            return
        log.info("node %s left the cluster (lease expired or removed)", name)
        # Its tunnel endpoint, nodes-map entry and routes first: nothing more goes there.
        await self._sink(self.sink.node_down, name)
        # Then its pods. The ipcache watch runs beside this one and may be deleting the same
        # entries (they lived under the same lease), so each entry is checked again after every
        # await. An entry written after this delete belongs to the node's next life (it came
        # back and the ipcache watch was quicker than this one): it stays, and goes back into
        # the maps, which node_down just emptied of everything behind the node's address.
        changed = False
        for ip, entry in list(self.remote_ips.items()):
            if entry.node != name or self.remote_ips.get(ip) is not entry:
                continue
            if ev.revision and self.remote_revs.get(ip, 0) > ev.revision:
                await self._sink(
                    self.sink.ipcache_set, host_prefix(ip), entry.identity, entry.host_ip or None
                )
                continue
            del self.remote_ips[ip]
            self.remote_revs.pop(ip, None)
            changed = True
            await self._sink(self.sink.ipcache_delete, host_prefix(ip))
        if changed:
            await self.owner.cluster_ipcache_changed()

    async def _on_ip(self, ev: WatchEvent) -> None:
        ip = ev.key[len(keys.IPCACHE) :]
        if ev.kind == "put":
            entry = IPEntry.loads(ev.value)
            if entry.node == self.config.node:
                return
            self.remote_revs[ip] = ev.revision
            if self.remote_ips.get(ip) == entry:
                return
            self.remote_ips[ip] = entry
            await self._sink(
                self.sink.ipcache_set, host_prefix(ip), entry.identity, entry.host_ip or None
            )
        elif ip in self.remote_ips:
            del self.remote_ips[ip]
            self.remote_revs.pop(ip, None)
            await self._sink(self.sink.ipcache_delete, host_prefix(ip))
        else:
            return
        await self.owner.cluster_ipcache_changed()

    async def _on_policy(self, ev: WatchEvent) -> None:
        if ev.key != keys.POLICY:
            return
        if ev.kind == "delete":
            self.policy, self.policy_mod = PolicySet(0, ()), 0
        else:
            self.policy, self.policy_mod = PolicySet.loads(ev.value), ev.revision
        await self.owner.cluster_policy_changed(self.policy)

    def _relister(self, prefix: str, on_event):
        async def relist(items: list[Item]) -> None:
            """After a compaction: replay the listing as puts and the vanished keys as deletes."""
            present = {i.key for i in items}
            for item in items:
                await on_event(WatchEvent("put", item.key, item.value, item.mod_revision))
            for key in self._known_keys(prefix) - present:
                await on_event(WatchEvent("delete", key, "", 0))

        return relist

    def _known_keys(self, prefix: str) -> set[str]:
        if prefix == keys.NODES:
            return {keys.node(n) for n in self.nodes}
        if prefix == keys.IPCACHE:
            return {keys.ipcache(ip) for ip in self.remote_ips}
        if prefix == keys.IDENTITY_ID:
            return {keys.identity_id(n) for n in self.identities.by_id}
        return set()

    async def _sink(self, fn, *args) -> None:
        if self._sink_batch is not None:
            self._sink_batch.append((fn, args))
            return
        async with self._sink_lock:  # one call at a time, in order, off the loop
            await asyncio.to_thread(fn, *args)


def _routing_of(record: NodeRecord) -> tuple[str, ...]:
    """What the datapath knows of a node: a change here is a new node_up."""
    return (record.underlay_ip, record.pod_cidr, record.pod_cidr6, record.underlay_ip6)


def _run_all(calls: list) -> None:
    for fn, args in calls:
        fn(*args)
