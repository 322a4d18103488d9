"""The agent's side of toFQDNs (mixed into Agent): learn the IPs of allowed DNS answers, put them
into the ipcache and policy before the answer is released, forget them when their TTL ran out
and no connection uses them or their endpoint is deleted, and keep the table in the store across
restarts.

`fqdn_hold()` is called for every allowed answer and is synchronous: an answer whose IPs the
endpoint already had for that name (the common case: a name asked again) costs a few dict
lookups, and the DNS proxy releases it at once, unless one of its IPs is still on its way into
the datapath for an earlier answer (then it waits for that update too).

An IP new to the node whose set of selecting toFQDNs selectors already has an identity needs only
its ipcache entry (kernel and agent: the fast path, no compile). Anything else recompiles with the
previous compilation (only what changed is rebuilt) and installs the diff. Many
answers arriving together share one recompile: each waits for a compile that started after its
own IPs were recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time

from l7proxy.agent.fqdn_cache import FqdnCache
from policies.compile import LearnedLabels
from policies.fqdn import is_fqdn_identity

log = logging.getLogger("l7proxy.agent")
FQDN_REFRESH_SAVE = 30.0  # seconds: how stale stored expiries may get when no IP changed


class FqdnLearning:
    def _init_fqdn(self, min_ttl: float, max_ips: int) -> None:
        self.fqdn = FqdnCache(min_ttl, max_ips, state=self.store.get("fqdn"))
        self._fqdn_learned_gen = 0  # bumped by every change of the table
        self._fqdn_compiled_gen = 0  # the table generation the installed policy has
        self._fqdn_gc_task: asyncio.Task | None = None
        self._fqdn_index = None  # (rules, LearnedLabels) of the installed compilation
        self._fqdn_installing: dict[str, asyncio.Future] = {}  # IP -> the update bringing it
        self._fqdn_saved_at = time.monotonic()
        self._fqdn_saving: asyncio.Future | None = None
        self._fqdn_put_lock = threading.Lock()
        self._fqdn_snapshots = 0  # numbers the table's snapshots: an older one never wins
        self._fqdn_put_seq = 0

    def fqdn_hold(self, endpoint: str, names, ips) -> asyncio.Future | None:
        """Record an allowed answer (called by the DNS proxy before it releases the answer to
        the pod). None: the datapath already has every IP, release now; else a future that is
        done once it has them."""
        if not ips:
            return None
        if not self.fqdn.learn(endpoint, names, ips, time.time()):
            # every IP was known: its expiry moved, nothing in the datapath changes, unless an
            # earlier answer's update that carries one of these IPs has not finished yet
            if not self._fqdn_installing:
                return None
            waits = {self._fqdn_installing.get(ip) for ip, _ in ips} - {None}
            if not waits:
                return None
            return next(iter(waits)) if len(waits) == 1 else asyncio.gather(*waits)
        self._fqdn_learned_gen += 1
        update = asyncio.ensure_future(self._fqdn_update([ip for ip, _ in ips]))
        for ip, _ in ips:
            self._fqdn_installing[ip] = update
        update.add_done_callback(self._fqdn_installed)
        return update

    def _fqdn_installed(self, update: asyncio.Future) -> None:
        for ip in [ip for ip, f in self._fqdn_installing.items() if f is update]:
            del self._fqdn_installing[ip]
        if not update.cancelled() and update.exception() is not None:
            log.error("FQDN datapath update failed: %r", update.exception())

    async def learn_fqdn(self, endpoint: str, names, ips) -> bool:
        """fqdn_hold, awaited: True when the answer had to be held for a datapath update."""
        update = self.fqdn_hold(endpoint, names, ips)
        if update is None:
            return False
        await update
        return True

    async def _fqdn_update(self, ips: list[str]) -> None:
        fresh = [ip for ip in ips if self.ipcache.get(ip) is None]
        if fresh and await self._fqdn_fast_path(fresh):
            return
        await self._fqdn_apply(self._fqdn_learned_gen)

    async def _fqdn_fast_path(self, fresh: list[str]) -> bool:
        """IPs new to the node whose selector set already has an identity: one ipcache entry
        each (kernel and agent), no compile. False (nothing done) when any needs a compile."""
        async with self._lock:
            compiled = self.compiled
            if compiled is None:
                return False
            if self._fqdn_index is None or self._fqdn_index[0] is not compiled.rules:
                self._fqdn_index = (compiled.rules, LearnedLabels(compiled.rules))
            index = self._fqdn_index[1]
            entries = []
            for ip in fresh:
                labels = index.labels(self.fqdn.names_of(ip), ip)
                number = self.allocator.lookup(labels) if labels is not None else None
                if number is None or self.ipcache.get(ip) is not None:
                    return False
                entries.append((f"{ip}/32" if ":" not in ip else f"{ip}/128", number))
            for cidr, number in entries:
                self.ipcache.upsert(cidr, number)
                self.datapath.ipcache_upsert(cidr, number)  # an IPv6 one into ipcache6
            return True

    async def _fqdn_apply(self, generation: int) -> None:
        async with self._lock:
            if self._fqdn_compiled_gen >= generation or self.compiled is None:
                return  # a compile that started after our change already installed it
            start_gen = self._fqdn_learned_gen
            compiled = await asyncio.to_thread(self._fqdn_recompile)
            await asyncio.to_thread(self._install, compiled)
            self._fqdn_compiled_gen = start_gen

    def _fqdn_recompile(self):
        return self._compile_rules(self.compiled.rules, self.compiled.revision, self.compiled)

    def start_fqdn_gc(self, interval: float) -> None:
        self._fqdn_gc_task = asyncio.ensure_future(self._fqdn_gc_loop(interval))

    async def _fqdn_gc_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if self.fqdn.gc(time.time(), self._ips_with_connections):
                    self._fqdn_learned_gen += 1
                    await self._fqdn_apply(self._fqdn_learned_gen)
                self._fqdn_save_soon()
            except Exception:  # noqa: BLE001 - the sweep must outlive one bad round
                log.exception("FQDN garbage collection failed")

    def _ips_with_connections(self) -> set[str]:
        """Peer addresses of the live flows conntrack tracks (not expired, not closing): an
        expired IP among them stays until they close."""
        dp = getattr(self.datapath, "dp", None)
        if dp is None:
            return set()
        from redirect_bpf.structs import CT_CLOSING

        alive, now = set(), time.monotonic_ns()
        with contextlib.suppress(Exception):
            for key, entry in dp.conntrack():
                if entry.expires_ns <= now or entry.flags & CT_CLOSING:
                    continue
                for addr in (key.addr_lo, key.addr_hi):
                    alive.add(socket.inet_ntoa(addr.to_bytes(4, "little")))
            for key, entry in dp.conntrack6():
                if entry.expires_ns <= now or entry.flags & CT_CLOSING:
                    continue
                for addr in (key.addr_lo, key.addr_hi):
                    alive.add(socket.inet_ntop(socket.AF_INET6, bytes(addr)))
        return alive

    def fqdn_status(self) -> dict:
        learned = self.fqdn.learned()
        ips = {ip for found in learned.values() for ip in found}
        numbers = {
            n for n, labels in self.allocator.identities().items() if is_fqdn_identity(labels)
        }
        dns = self.dns_proxy.status()["detail"] if self.dns_proxy is not None else "no DNS proxy"
        return {
            "state": "ok" if self.dns_proxy is not None else "off",
            "detail": f"{dns}; {len(learned)} names, {len(ips)} IPs, {len(numbers)} identities",
            "names": len(learned),
            "ips": len(ips),
            "identities": len(numbers),
        }

    def _fqdn_save_soon(self) -> None:
        """Every GC round: the table goes to the store on a worker thread (JSON and SQLite stay
        off the event loop the DNS proxy answers on) when an IP came or went, or when only
        expiries moved and the last write is FQDN_REFRESH_SAVE seconds old. A restart keeps
        what was learned up to a GC round before."""
        c = self.fqdn
        if self._fqdn_saving is not None and not self._fqdn_saving.done():
            return  # the previous write is still going; the next round catches up
        stale = time.monotonic() - self._fqdn_saved_at >= FQDN_REFRESH_SAVE
        if c.dirty or (c.refreshed and stale):
            self._fqdn_saved_at = time.monotonic()
            self._fqdn_saving = asyncio.ensure_future(asyncio.to_thread(*self._fqdn_snapshot()))

    def save_fqdn(self) -> None:
        """The learned table into the store now (at stop, and when an endpoint is deleted)."""
        if self.fqdn.dirty or self.fqdn.refreshed:
            put, seq, state = self._fqdn_snapshot()
            put(seq, state)

    def _fqdn_snapshot(self):
        self._fqdn_snapshots += 1
        return self._fqdn_put, self._fqdn_snapshots, self.fqdn.to_state()

    def _fqdn_put(self, seq: int, state: dict) -> None:
        with self._fqdn_put_lock:
            if seq > self._fqdn_put_seq:  # a write that lost the race to a newer one is skipped
                self._fqdn_put_seq = seq
                self.store.put("fqdn", state)

    async def fqdn_forget_endpoint(self, endpoint: str) -> bool:
        """A deleted endpoint's learned names go, persistently; the caller recompiles, which
        drops the ipcache entries and FQDN identities no other endpoint's names still need."""
        if not self.fqdn.forget_endpoint(endpoint):
            return False
        self._fqdn_learned_gen += 1
        await asyncio.to_thread(self.save_fqdn)
        return True

    def stop_fqdn_gc(self) -> None:
        if self._fqdn_gc_task is not None:
            self._fqdn_gc_task.cancel()
        self.save_fqdn()
