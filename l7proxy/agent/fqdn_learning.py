"""The agent's side of toFQDNs (mixed into Agent): learn the IPs of allowed DNS answers, put them
into the ipcache and policy before the answer is released, forget them when their TTL ran out
and no connection uses them, and keep the table in the store across restarts.

A new IP for a name recompiles with the previous compilation (only what changed is rebuilt; an
IP that joins an existing selector set only adds an ipcache entry) and installs the diff. Many
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
from policies.fqdn import is_fqdn_identity

log = logging.getLogger("l7proxy.agent")


class FqdnLearning:
    def _init_fqdn(self, min_ttl: float, max_ips: int) -> None:
        self.fqdn = FqdnCache(min_ttl, max_ips, state=self.store.get("fqdn"))
        self._fqdn_learned_gen = 0  # bumped by every change of the table
        self._fqdn_compiled_gen = 0  # the table generation the installed policy has
        self._fqdn_gc_task: asyncio.Task | None = None

    async def learn_fqdn(self, endpoint: str, names, ips) -> bool:
        """Called by the DNS proxy with an allowed answer, before it is released to the pod;
        True when the datapath had to be updated (the answer was held for it)."""
        if not self.fqdn.learn(endpoint, names, ips, time.time()):
            return False  # every IP was known: its expiry moved, nothing in the datapath changes
        self._fqdn_learned_gen += 1
        await self._fqdn_apply(self._fqdn_learned_gen)
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
        self.store.put("fqdn", self.fqdn.to_state())
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

    def stop_fqdn_gc(self) -> None:
        if self._fqdn_gc_task is not None:
            self._fqdn_gc_task.cancel()
