"""The agent's side of toFQDNs (mixed into Agent): learn the IPs of allowed DNS answers, put them
into the ipcache and policy before the answer is released, forget them when their TTL ran out
and no connection uses them, and keep the table in the store across restarts.

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
import time

from l7proxy.agent.fqdn_cache import FqdnCache
from policies.compile import LearnedLabels
from policies.fqdn import is_fqdn_identity

log = logging.getLogger("l7proxy.agent")


class FqdnLearning:
    def _init_fqdn(self, min_ttl: float, max_ips: int) -> None:
        self.fqdn = FqdnCache(min_ttl, max_ips, state=self.store.get("fqdn"))
        self._fqdn_learned_gen = 0  # bumped by every change of the table
        self._fqdn_compiled_gen = 0  # the table generation the installed policy has
        self._fqdn_gc_task: asyncio.Task | None = None
        self._fqdn_index = None  # (rules, LearnedLabels) of the installed compilation

    async def learn_fqdn(self, endpoint: str, names, ips) -> bool:
        """Called by the DNS proxy with an allowed answer, before it is released to the pod;
        True when the datapath had to be updated (the answer was held for it)."""
        fresh = [ip for ip, _ in ips if self.ipcache.get(ip) is None]
        if not self.fqdn.learn(endpoint, names, ips, time.time()):
            return False  # every IP was known: its expiry moved, nothing in the datapath changes
        self._fqdn_learned_gen += 1
        if fresh and await self._fqdn_fast_path(fresh):
            return True
        await self._fqdn_apply(self._fqdn_learned_gen)
        return True

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
                if ":" not in cidr:
                    self.datapath.ipcache_upsert(cidr, number)
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
                if self.fqdn.gc(time.time(), self._ips_with_connections()):
                    self._fqdn_learned_gen += 1
                    await self._fqdn_apply(self._fqdn_learned_gen)
                self.save_fqdn()
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

    def save_fqdn(self) -> None:
        """The learned table into the store (every GC round when it changed, and at stop): a
        restart keeps what was learned up to a second before."""
        if self.fqdn.dirty:
            self.store.put("fqdn", self.fqdn.to_state())

    def stop_fqdn_gc(self) -> None:
        if self._fqdn_gc_task is not None:
            self._fqdn_gc_task.cancel()
        self.save_fqdn()
