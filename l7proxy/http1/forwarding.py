"""Requests of an HTTP/1 client connection going out and their answers coming back, in order.

The front of the session's queue is the one request in flight: it is answered in place (a 403,
a parse error) or sent on the session's upstream connection (from the pool, or opened now); the
upstream connection (l7proxy/http1/upstream.py) reports the end of each response, a tunnel, a
head too large, or its loss. A mixin of `Http1Session`.
"""

from __future__ import annotations

import asyncio
import time

from l7proxy.flows import DROPPED, FORWARDED
from l7proxy.http1.exchange import Exchange, emit_error_flow, emit_flow
from l7proxy.http1.lifetime import IDLE, PARK, RESPONSE
from l7proxy.http1.states import DRAINING, OPEN, TUNNEL, UPGRADING_DRAINING
from l7proxy.http1.upstream import UpstreamConn
from l7proxy.session import NO_DEADLINE, PauseReason
from parsers.http1 import head_bytes, simple_response

_monotonic = time.monotonic
# A request that may go again on a fresh connection when a reused one was closed under it.
_RETRYABLE = (b"GET", b"HEAD", b"OPTIONS")


class Forwarding:
    __slots__ = ()

    # ---- the request in flight ---------------------------------------------------------------

    def _start(self, ex: Exchange) -> None:
        if ex.error is not None:
            err = ex.error
            body = f"{err.status} {err.reason}\r\n".encode("latin-1", "replace")
            self.transport.write(simple_response(err.status, body, close=True))
            ex.answered = True
            emit_error_flow(self.ctx, ex, err.status, "PARSE_ERROR")
            self._close()
            return
        if not ex.allowed:
            self.pm.denied.value += 1
            ex.answered = True
            ex.status = 403
            if ex.req.expect_continue and not ex.complete:
                # The client waits for 100-continue; it will not send the body we would need to
                # skip to keep framing, so this connection ends with the 403.
                ex.keep_alive = False
                self.transport.write(self.deny_close_bytes)
            else:
                self.transport.write(self.deny_bytes)
            if ex.complete or not ex.keep_alive:
                self._finish(ex)
            return
        self.pm.forwarded.value += 1
        up = self.upstream
        if up is None or up.closed:
            up = self.upstream = self.pool.acquire(self.ctx.destination)
            if up is None:
                self._connect(ex)
                return
            up.session = self
        self._send(ex, up)

    def _send(self, ex: Exchange, up: UpstreamConn) -> None:
        ex.sent = True
        up.parser.expect(ex.req.method)
        up.got_bytes = False
        up.in_head = True  # (UpstreamConn.begin, inlined: this runs per request)
        cfg = self.cfg
        up.max_head = cfg.max_response_header_bytes
        head = ex.raw or head_bytes(ex.req)
        if ex.pending:
            up.transport.writelines([head, *ex.pending])
            ex.pending = None
        else:
            up.transport.write(head)
        if ex.complete:
            timeout = cfg.upstream_response_timeout  # (_await_response, inlined)
            if timeout:
                self.deadline_kind = RESPONSE
                self.deadline = ex.start + timeout
            else:
                self.deadline_kind = NO_DEADLINE
        else:
            # The body is still coming (paced by backpressure): the response clock starts when
            # it ends; meanwhile a client that stops sending is cut after the idle timeout.
            self._set_deadline(IDLE, self.cfg.idle_timeout)

    def _finish(self, ex: Exchange) -> None:
        """A request the proxy answered itself is done."""
        if self.queue and self.queue[0] is ex:
            self.queue.pop(0)
        if ex.req is not None and ex.status == 403 and self.ctx.flows.active:
            emit_flow(self.ctx, ex, DROPPED, _monotonic())
        if not ex.keep_alive:
            self._close()
            return
        if ex.req is not None and not ex.req.has_body:
            self._next(ex.start)  # answered at once: its start is "now" for the idle deadline
        else:
            self._next()

    def _next(self, now: float = 0.0) -> None:
        """The request in flight is done: start the next one, or wait for one."""
        if self.closed:
            return
        if self.queue:
            self._start(self.queue[0])
        else:
            cfg = self.cfg
            if self.upstream is None or cfg.upstream_park_after >= cfg.idle_timeout:
                self.deadline_kind = IDLE
                self.deadline = (now or _monotonic()) + cfg.idle_timeout
            else:
                self.deadline_kind = PARK
                self.deadline = (now or _monotonic()) + cfg.upstream_park_after
            state = self.state
            if state is not OPEN and (state is DRAINING or state is UPGRADING_DRAINING):
                self._close()
                return
        if (
            self.paused
            and len(self.queue) <= self.cfg.http1_max_pipeline // 2
            and self.state <= DRAINING  # (not while an upgrade holds the client's bytes)
        ):
            last = self.parsing
            if last is None or last.keep_alive:
                self.resume_client_reading(PauseReason.REQUEST_QUEUE)

    # ---- opening the upstream connection -----------------------------------------------------

    def _connect(self, ex: Exchange) -> None:
        self.pause_client_reading(PauseReason.CONNECTING)
        self.connecting = asyncio.get_running_loop().create_task(self._open_upstream(ex))

    async def _open_upstream(self, ex: Exchange) -> None:
        cfg = self.cfg
        try:
            up = await self.pool.connect(
                self.ctx.destination, cfg.write_high_water, cfg.write_low_water
            )
        except TimeoutError:
            self._upstream_failed(ex, 504, "timeout")
            return
        except OSError:
            self._upstream_failed(ex, 503, "refused")
            return
        finally:
            self.connecting = None
        if self.closed:
            self.pool.release(up)
            return
        up.session = self
        self.upstream = up
        self.resume_client_reading(PauseReason.CONNECTING)
        if self.queue and self.queue[0] is ex:
            self._send(ex, up)

    def _upstream_failed(self, ex: Exchange, status: int, kind: str) -> None:
        getattr(self.pm, f"upstream_{kind}").inc()
        self.resume_client_reading(PauseReason.CONNECTING)
        if self.closed:
            return
        msg = b"upstream connect error\r\n" if status == 503 else b"upstream timeout\r\n"
        self.transport.write(simple_response(status, msg, close=not ex.complete))
        ex.answered = True
        ex.status = status
        emit_error_flow(self.ctx, ex, status, f"UPSTREAM_{kind.upper()}")
        if not ex.complete:
            self._close()
            return
        self.queue.pop(0)
        if self.state is not OPEN and self._is_upgrade_answered(ex):
            self._upgrade_refused()  # (it once stayed held, the client paused, until idle)
            return
        self._next()

    # ---- answers (called by UpstreamConn) ----------------------------------------------------

    def on_response_end(self, ev) -> None:
        if not self.queue:
            return
        ex = self.queue.pop(0)
        ex.status = ev.status
        now = _monotonic()
        self.pm.duration.observe(now - ex.start)
        if self.ctx.flows.active:
            emit_flow(self.ctx, ex, FORWARDED, now)
        up = self.upstream
        if not ev.keep_alive or not ex.complete:
            # The upstream closes, or answered before the request body ended: the rest of that
            # body can't be delivered in sync, so neither connection is reused.
            if up is not None:
                up.close()
                self.upstream = None
            if not ex.complete:
                ex.keep_alive = False
        if not ex.keep_alive:
            self._close()
            return
        if self.state is not OPEN and self._is_upgrade_answered(ex):
            self._upgrade_refused(now)
            return
        self._next(now)

    def on_response_head_too_large(self, up: UpstreamConn) -> None:
        """The upstream's response head passed `max_response_header_bytes` before it ended:
        none of it reached the client, which gets a 502; the upstream connection is dropped."""
        if up is not self.upstream or self.closed:
            return
        self.upstream = None
        up.close()
        ex = self.queue[0] if self.queue else None
        if ex is None:
            self._close()
            return
        self.ctx.metrics.upstream_errors.labels(proto="http", kind="invalid_response").inc()
        self.transport.write(
            simple_response(502, b"upstream response header too large\r\n", close=not ex.complete)
        )
        ex.answered = True
        ex.status = 502
        emit_error_flow(self.ctx, ex, 502, "UPSTREAM_RESPONSE_HEADER_TOO_LARGE")
        if not ex.complete or not ex.keep_alive:
            self._close()
            return
        self.queue.pop(0)
        if self._is_upgrade_answered(ex):
            self._upgrade_refused()
            return
        self._next()

    def on_upstream_lost(self, up: UpstreamConn, why: str) -> None:
        if up is not self.upstream:
            return
        self.upstream = None
        if self.closed:
            return
        if self.state is TUNNEL:
            self._close()
            return
        ex = self.queue[0] if self.queue else None
        if ex is None or not ex.sent:
            return  # an idle keep-alive connection went away: the next request opens another
        if up.got_bytes:
            status = up.parser.status
            if why == "closed" and up.parser.ends_at_close:
                # A body delimited by the close is complete; the client's end is a close too.
                self.queue.pop(0)
                ex.status = status
                now = _monotonic()
                self.pm.duration.observe(now - ex.start)
                emit_flow(self.ctx, ex, FORWARDED, now)
                self._close()
                return
            # Mid-response: the client's connection ends too, so it sees the response cut.
            self.pm.upstream_reset.inc()
            ex.status = status or 502
            if self.ctx.flows.active:
                emit_error_flow(self.ctx, ex, ex.status, "UPSTREAM_RESET")
            self._close()
            return
        if up.reused and ex.req.method in _RETRYABLE and not ex.req.has_body:
            # A pooled connection closed by the upstream as we reused it: retry once, fresh.
            ex.sent = False
            self._connect(ex)
            return
        self._upstream_failed(ex, 503, "reset")
