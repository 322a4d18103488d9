"""The names the DNS proxy learned: per endpoint, name -> {IP: expiry}, from the allowed answers
that endpoint got (Cilium's per-endpoint DNS cache). The policy compiler reads the union as
`learned` ({name: IPs}); IPs are node-local facts, never shared with other nodes.

An IP stays for the answer's TTL (raised to `min_ttl`); an endpoint keeps at most `max_ips`
unexpired IPs per name (over the cap, the soonest to expire are expired at once, and gc() forgets
them), so a name whose IPs rotate on every answer (S3) stays bounded. An expired IP that still has live connections (the
caller passes the IPs conntrack holds) is kept until they close, so a TTL never cuts a
connection. Times are seconds on the wall clock (`time.time()`), so the table survives a restart
through `to_state()`/`FqdnCache(state=...)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

STATE_VERSION = 1


class FqdnCache:
    def __init__(self, min_ttl: float = 0, max_ips: int = 1000, state: dict | None = None):
        self.min_ttl = min_ttl
        self.max_ips = max_ips
        # endpoint -> name -> ip -> expiry (seconds since the epoch)
        self._eps: dict[str, dict[str, dict[str, float]]] = {}
        # ip -> name -> how many endpoints learned that IP for that name (names_of's index)
        self._by_ip: dict[str, dict[str, int]] = {}
        self.dirty = False  # an IP came or went since the last to_state()
        self.refreshed = False  # only expiries moved since the last to_state()
        if state and state.get("version") == STATE_VERSION:
            for ep, names in state.get("endpoints", {}).items():
                self._eps[ep] = {n: dict(ips) for n, ips in names.items()}
                for name, ips in self._eps[ep].items():
                    for ip in ips:
                        self._index(ip, name, 1)

    def learn(
        self, endpoint: str, names: Iterable[str], ips: Iterable[tuple[str, int]], now: float
    ) -> bool:
        """Record an allowed answer; True when an IP is new for a name (the policy must then
        be recompiled before the answer is released)."""
        ips = list(ips)
        if not ips:
            return False
        table = self._eps.setdefault(endpoint, {})
        changed = False
        for name in names:
            known = table.setdefault(name, {})
            for ip, ttl in ips:
                expiry = now + max(ttl, self.min_ttl)
                old = known.get(ip)
                if old is None:
                    changed = True
                    known[ip] = expiry
                    self._index(ip, name, 1)
                elif expiry > old:
                    known[ip] = expiry
            if len(known) > self.max_ips:
                self._over_cap(known, now)
        self.dirty = self.dirty or changed
        self.refreshed = True
        return changed

    def _over_cap(self, known: dict[str, float], now: float) -> None:
        """More than max_ips unexpired IPs for one name: the soonest to expire are marked
        expired now. The next GC round forgets them unless a connection still uses them (a
        cap, like a TTL, never cuts a connection), and recompiles once for all of them."""
        live = [ip for ip, expiry in known.items() if expiry > now]
        if len(live) > self.max_ips:
            for ip in sorted(live, key=known.get)[: len(live) - self.max_ips]:
                known[ip] = now
            self.dirty = True

    def gc(self, now: float, alive: Callable[[], set[str]] = frozenset) -> bool:
        """Forget expired IPs, except those in `alive()` (IPs with live connections, asked for
        only when some IP has expired); True when something was forgotten."""
        changed = False
        keep: set[str] | None = None
        for ep in list(self._eps):
            names = self._eps[ep]
            for name in list(names):
                ips = names[name]
                expired = [ip for ip, exp in ips.items() if exp <= now]
                if expired and keep is None:
                    keep = alive()
                for ip in expired:
                    if ip not in keep:
                        del ips[ip]
                        self._index(ip, name, -1)
                        changed = True
                if not ips:
                    del names[name]
            if not names:
                del self._eps[ep]
        self.dirty = self.dirty or changed
        return changed

    def forget_endpoint(self, endpoint: str) -> bool:
        """An endpoint was deleted: its names go (IPs other endpoints learned stay)."""
        names = self._eps.pop(endpoint, None)
        for name, ips in (names or {}).items():
            for ip in ips:
                self._index(ip, name, -1)
        gone = names is not None
        self.dirty = self.dirty or gone
        return gone

    def _index(self, ip: str, name: str, delta: int) -> None:
        names = self._by_ip.setdefault(ip, {})
        count = names.get(name, 0) + delta
        if count > 0:
            names[name] = count
        else:
            names.pop(name, None)
            if not names:
                del self._by_ip[ip]

    def names_of(self, ip: str) -> set[str]:
        """Every name, over all endpoints, that `ip` was learned for (an index lookup: the
        fast path asks this for every IP new to the node)."""
        return set(self._by_ip.get(ip, ()))

    def learned(self) -> dict[str, set[str]]:
        """{name: IPs} over every endpoint: what toFQDNs selectors resolve against."""
        out: dict[str, set[str]] = {}
        for names in self._eps.values():
            for name, ips in names.items():
                out.setdefault(name, set()).update(ips)
        return out

    def entries(self) -> list[dict]:
        """For `fqdn cache list`: one row per endpoint, name and IP."""
        return [
            {"endpoint": ep, "name": name, "ip": ip, "expires": exp}
            for ep, names in sorted(self._eps.items())
            for name, ips in sorted(names.items())
            for ip, exp in sorted(ips.items())
        ]

    def size(self) -> int:
        return sum(len(ips) for names in self._eps.values() for ips in names.values())

    def to_state(self) -> dict:
        """A copy (safe to serialize on another thread while the table changes)."""
        self.dirty = self.refreshed = False
        endpoints = {
            ep: {n: dict(ips) for n, ips in names.items()} for ep, names in self._eps.items()
        }
        return {"version": STATE_VERSION, "endpoints": endpoints}
