"""The node proxy's TIME_WAIT reaper.

The tc programs hand a redirected connection to the node proxy with bpf_sk_assign, so the
accepted socket lives in the host namespace with the original tuple: local = the destination
(`web:80`), peer = the client. When the proxy closes first (a `Connection: close` response), the
host keeps a TIME_WAIT socket for that tuple for 60 s, and it does harm twice over:
- the client's next connection from the same port, redirected again, is handed to the proxy's
  listener, whose request socket cannot be inserted beside the TIME_WAIT entry: the SYN is
  dropped and the client retries after 1 s (short-connection load stalled on it);
- if that next connection is no longer redirected (the L7 rule was removed), the host's early
  demux attaches the TIME_WAIT socket to the forwarded SYN and ip_forward drops it: the client
  cannot reach `web:80` from that port for a minute.
Both ends of the real conversation keep their own TIME_WAIT in their own namespaces; the host's
copy is an artefact of the transparent socket. So the agent destroys it (sock_diag SOCK_DESTROY,
which retires a TIME_WAIT socket at once).

Which sockets: TIME_WAIT sockets in the agent's (host) namespace whose local address is not an
address of the host (a bind() to it fails). Only a transparent socket can have such an address;
the host's own connections always have one of its addresses and are left alone.

When: the namespace's TIME_WAIT count (/proc/net/sockstat, one small read) is checked every
`interval` (100 ms), every 20 ms while sweeps keep finding some; a dump of the TIME_WAIT sockets
(a walk of the whole TCP hash, ~1.2 ms per family on a host with 262,144 buckets) runs only when
that count differs from what the last sweep left. Short connections through the proxy (wrk -c4,
`Connection: close`): 100 ms left 4 client SYN retransmits in ~14,000 connections (a port reused
inside the window), 20 ms while busy none in three runs.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
from collections.abc import Callable

from l7proxy import sock_diag
from l7proxy.platform import family_of

log = logging.getLogger("l7proxy.agent")

SOCKSTAT = "/proc/net/sockstat"
LOCAL_CACHE_SECONDS = 10.0
BUSY_INTERVAL = 0.02  # after a sweep that destroyed something: connections are closing now


def time_wait_count(path: str = SOCKSTAT) -> int:
    """TIME_WAIT sockets of the reading process's namespace (both families)."""
    with open(path) as f:
        for line in f:
            if line.startswith("TCP:"):
                words = line.split()
                return int(words[words.index("tw") + 1])
    return 0


def is_host_address(ip: str) -> bool:
    """True if `ip` is an address of this namespace: bind() to it works without IP_FREEBIND.
    An address bind() cannot judge (a link-local one needs its interface) counts as the host's:
    what is not known to be a transparent socket's is left alone."""
    with socket.socket(family_of(ip), socket.SOCK_DGRAM) as s:
        try:
            s.bind((ip, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


class TimeWaitReaper:
    def __init__(
        self,
        interval: float = 0.1,
        on_reaped: Callable[[int], None] | None = None,
        ipv6: bool = True,
    ) -> None:
        self.interval = interval
        # each family's dump walks the whole hash: no IPv6 endpoints, no IPv6 walk
        self.families = (socket.AF_INET, socket.AF_INET6) if ipv6 else (socket.AF_INET,)
        self.on_reaped = on_reaped or (lambda n: None)
        self._last = 0
        self._left = -1  # TIME_WAIT sockets the last sweep kept (the host's own)
        self._local: dict[str, tuple[bool, float]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _host_address(self, ip: str, now: float) -> bool:
        hit = self._local.get(ip)
        if hit is None or now - hit[1] > LOCAL_CACHE_SECONDS:
            hit = (is_host_address(ip), now)
            if len(self._local) > 4096:
                self._local.clear()
            self._local[ip] = hit
        return hit[0]

    def sweep(self) -> int:
        """One pass: destroy the transparent TIME_WAIT sockets; returns how many went."""
        now = time.monotonic()
        doomed, kept = [], 0
        with sock_diag.open_diag() as nl:
            for family in self.families:
                for s in sock_diag.dump(nl, socket.IPPROTO_TCP, 1 << sock_diag.TCP_TIME_WAIT,
                                        family):  # fmt: skip
                    # FIN_WAIT2 in its TIME_WAIT form: the peer is not done yet, let it be
                    if s.state != sock_diag.TCP_TIME_WAIT or self._host_address(s.src[0], now):
                        kept += 1
                    else:
                        doomed.append(s)
            gone = sock_diag.destroy_many(nl, doomed) if doomed else 0
        self._left = kept
        if gone:
            self.on_reaped(gone)
        return gone

    def due(self) -> bool:
        return time_wait_count() != self._left

    def run(self) -> None:
        while not self._stop.wait(BUSY_INTERVAL if self._last else self.interval):
            try:
                self._last = self.sweep() if self.due() else 0
            except OSError as exc:  # a kernel without SOCK_DESTROY, or a transient failure
                log.warning("TIME_WAIT reaper: %s; retrying in 5 s", exc)
                self._stop.wait(5.0)

    def start(self) -> TimeWaitReaper:
        self._thread = threading.Thread(target=self.run, name="timewait-reaper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
