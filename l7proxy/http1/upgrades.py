"""Upgrades of an HTTP/1 client connection: an allowed Upgrade or CONNECT is forwarded and what
the client sends after it is held until the upstream answers (101 or 2xx to CONNECT: a raw
tunnel; anything else: HTTP again), and an h2c Upgrade hands the transport to an HTTP/2 session
instead (l7proxy/http2/upgrade.py). A mixin of `Http1Session`; the state moves through the
table in l7proxy/http1/states.py."""

from __future__ import annotations

import time

from l7proxy.flows import FORWARDED
from l7proxy.http1.exchange import Exchange, emit_flow
from l7proxy.http1.states import H2C, REFUSED, SWITCHED, UPGRADE, UPGRADING, UPGRADING_DRAINING
from l7proxy.session import PauseReason

_monotonic = time.monotonic


class Upgrades:
    __slots__ = ()

    def _on_upgrade(self, rest: bytes) -> None:
        if self.h2c is not None:
            self._take_over_h2c(rest)
            return
        ex = self.parsing
        if ex is not None and ex.allowed and not ex.answered:
            # Hold everything after the head until the upstream says 101 (or 2xx to CONNECT).
            # Nothing more is parsed meanwhile, so `parsing` stays this exchange.
            self._to(UPGRADE)
            if rest:
                self.upgrade_buffer.append(rest)
            self.pause_client_reading(PauseReason.UPGRADE)  # what follows is held, so bounded
            return
        # Denied (answered in place): keep speaking HTTP.
        self._handle(self.parser.resume(rest))

    def _is_upgrade_answered(self, ex: Exchange) -> bool:
        """`ex`, whose answer just ended, is the upgrade the connection waits on."""
        state = self.state
        return (state is UPGRADING or state is UPGRADING_DRAINING) and ex is self.parsing

    def _upgrade_refused(self, now: float = 0.0) -> None:
        """The upgrade will not happen (an ordinary answer, or the proxy's own), and its
        exchange is done: what the client sent after it is HTTP again. The first request in it
        starts as it is parsed (the queue was empty), so only an empty queue needs `_next`: it
        once ran regardless, and sent that request upstream a second time."""
        self._to(REFUSED)
        buffered = b"".join(self.upgrade_buffer)
        self.upgrade_buffer = []
        self.resume_client_reading(PauseReason.UPGRADE)
        self._handle(self.parser.resume(buffered))
        if not self.queue:
            self._next(now)

    def on_tunnel(self) -> None:
        """101 Switching Protocols (or 2xx to CONNECT): from now on both sides are raw bytes."""
        ex = self.queue.pop(0) if self.queue else None
        self._to(SWITCHED)
        if ex is not None and self.ctx.flows.active:
            emit_flow(self.ctx, ex, FORWARDED, _monotonic())
        if self.upgrade_buffer:
            self.upstream.transport.writelines(self.upgrade_buffer)
            self.upgrade_buffer = []
        self.resume_client_reading(PauseReason.REQUEST_QUEUE | PauseReason.UPGRADE)

    def _take_over_h2c(self, rest: bytes) -> None:
        """Give the transport to an HTTP/2 session (101, then HTTP/2 both ways; the upgraded
        request is its stream 1, decided by the policy again like any stream)."""
        from l7proxy.http2.upgrade import take_over_h2c

        req, headers, decision, raw = self.h2c
        self.h2c = None
        up = self.upstream
        self.upstream = None
        if up is not None:  # an idle keep-alive connection from earlier requests
            self.pool.release(up)
        if self.paused:
            self.paused = 0
            self.transport.resume_reading()
        transport = self.transport
        session = take_over_h2c(
            self.ctx, transport, req.method.decode("latin-1"), req.target.decode("latin-1"),
            headers, b"", rest, previous=self,
        )  # fmt: skip
        if session is not None:
            self._to(H2C)  # the transport belongs to the HTTP/2 session now
            return
        # No usable HTTP2-Settings: the request goes on as an HTTP/1 upgrade, as any other.
        self.pm.received.value += 1
        ex = Exchange(req, True, decision.raw or raw, _monotonic())
        ex.logged = decision.logged or ()
        ex.complete = True
        self.parsing = ex
        self.queue.append(ex)
        self._start(ex)
        self._on_upgrade(rest)
