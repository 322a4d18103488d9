"""The HTTP/1.1 client session: parse, ask the policy, forward or answer, in order.

One `Http1Session` per client connection. Requests are handled one at a time towards the
upstream: pipelined requests wait in `queue` (with their bodies, bounded by pausing the client),
so responses — including a 403 in place of a denied request — go back in request order without
ever splitting an upstream read. Response bytes go to the client unchanged; request heads are
rebuilt from the parsed form (so nothing ambiguous reaches the upstream) and chunked bodies are
re-framed.

Backpressure: each transport pauses the other side's reading when its write buffer passes the
high water mark (`pause_client_reading(reason)` with reasons as bits, so several causes combine).
Timeouts: one deadline per session, checked by the worker's `DeadlineSweeper`.
"""

from __future__ import annotations

import asyncio
import time

from l7proxy.flows import DROPPED, FORWARDED
from l7proxy.http1.exchange import Exchange, emit_error_flow, emit_flow
from l7proxy.http1.upstream import UpstreamConn, UpstreamPool
from l7proxy.http1.verdicts import decide, recall, remember
from l7proxy.protocols import worker_upstreams
from l7proxy.session import NO_DEADLINE, PauseReason, Session
from parsers.http1 import (
    Data,
    EndOfMessage,
    ParseError,
    Request,
    RequestParser,
    Upgrade,
    encode_chunk,
    head_bytes,
    last_chunk,
    simple_response,
)

# Deadline kinds. PARK: idle, still holding an upstream connection (given back at the deadline,
# then IDLE runs on from the same start).
IDLE, HEAD, RESPONSE, PARK = 1, 2, 3, 4

_monotonic = time.monotonic


_DENY_CACHE: dict[str, tuple[bytes, bytes]] = {}


def _deny_responses(message: str) -> tuple[bytes, bytes]:
    hit = _DENY_CACHE.get(message)
    if hit is None:
        body = message.encode()
        hit = _DENY_CACHE[message] = (
            simple_response(403, body),
            simple_response(403, body, close=True),
        )
    return hit


class Http1Session(Session):
    # Slots: an idle keep-alive connection costs memory, not CPU (10,000 of them in the bench).
    __slots__ = (
        "ctx", "cfg", "pm", "pool", "sweeper", "parser", "queue", "parsing", "upstream",
        "tunnel", "upgrade_wait", "upgrade_buffer", "connecting", "draining", "deny_bytes",
        "deny_close_bytes", "h2c",
    )  # fmt: skip

    def __init__(self, ctx, pool: UpstreamPool | None = None, sweeper=None) -> None:
        super().__init__()
        self.ctx = ctx
        cfg = ctx.config
        self.cfg = cfg
        self.pm = ctx.proto_metrics
        self.pool = pool if pool is not None else (ctx.upstreams or worker_upstreams(cfg))
        self.sweeper = sweeper
        self.parser = RequestParser(cfg.max_header_bytes, cfg.max_header_count, cfg.max_uri_bytes)
        self.queue: list[Exchange] = []  # a list: mostly 0-1 long, far smaller than a deque
        self.parsing: Exchange | None = None
        self.upstream: UpstreamConn | None = None
        self.tunnel = False
        self.upgrade_wait: Exchange | None = None  # upgrade asked, answer not seen yet
        self.upgrade_buffer: list[bytes] = []
        self.connecting: asyncio.Task | None = None
        self.draining = False
        self.deny_bytes, self.deny_close_bytes = _deny_responses(cfg.deny_message)
        self.h2c: tuple | None = None  # an allowed h2c Upgrade waiting for its Upgrade event

    # ---- asyncio: client side ----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(self.cfg.write_high_water, self.cfg.write_low_water)
        if self.sweeper is not None:
            self.sweeper.add(self)
        self._set_deadline(IDLE, self.cfg.idle_timeout)

    def data_received(self, data: bytes) -> None:
        # An exception here is caught by the loop, which closes this transport only (and
        # connection_lost releases the upstream): one bad connection never stops a worker.
        if self.tunnel:
            self.upstream.transport.write(data)
            return
        if self.upgrade_wait is not None:
            self.upgrade_buffer.append(data)
            return
        parser = self.parser
        if not self.queue:
            rules = self.ctx.rules()
            known = recall(rules, data)
            if known is not None and parser.idle and not self.draining:
                # A read identical to one the strict parser took as exactly one complete
                # keep-alive request without a body: same bytes, same request, same verdict.
                req, decision = known
                pm = self.pm
                pm.received.value += 1
                ex = Exchange(req, decision.allowed, decision.raw or data, _monotonic())
                ex.logged = decision.logged
                ex.complete = True
                self.parsing = ex
                self.queue.append(ex)
                up = self.upstream
                if ex.allowed and up is not None and not up.closed:
                    pm.forwarded.value += 1  # (_start, for the case at hand)
                    self._send(ex, up)
                else:
                    self._start(ex)
                return
        else:
            rules = None
        events = parser.receive_data(data)
        if len(events) == 2 and events[0].__class__ is Request and parser.idle:
            # The common case: one request without a body. When the read is exactly that head
            # (its canonical size, from the method to the blank line) the bytes that passed
            # the strict parser go upstream as they came; otherwise the head is rebuilt (a
            # read may also hold the first bytes of the next request).
            req = events[0]
            exact = (
                len(data) == req.head_len
                and data.startswith(req.method)
                and data.endswith(b"\r\n\r\n")
            )
            if req.chunked:  # a whole chunked request with an empty body: the tail goes too
                self._on_request(req, data if exact else None)
                self._on_end(events[1])
            else:
                self._on_request(req, data if exact else None, events[1], rules)
            return
        self._handle(events)
        if parser.in_head and not self.queue and self.deadline_kind != HEAD and not self.closed:
            self._set_deadline(HEAD, self.cfg.header_timeout)

    def _handle(self, events) -> None:
        for ev in events:
            cls = ev.__class__
            if cls is Request:
                self._on_request(ev)
            elif cls is Data:
                self._on_data(ev.data)
            elif cls is EndOfMessage:
                self._on_end(ev)
            elif cls is ParseError:
                self._on_parse_error(ev)
            elif cls is Upgrade:
                self._on_upgrade(ev.rest)
            if self.closed:
                return

    def eof_received(self):
        # Half-close from the client: finish what is queued, then close (no keep-alive).
        if not self.queue:
            return False
        for ex in self.queue:
            ex.keep_alive = False
        return True

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.pm.active.dec()
        if self.sweeper is not None:
            self.sweeper.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
        up = self.upstream
        self.upstream = None
        if up is not None:
            if not self.queue and not self.tunnel and not up.closed:
                self.pool.release(up)
            else:
                up.close()

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.transport is not None and not up.closed:
            up.transport.resume_reading()

    # ---- requests ----------------------------------------------------------------------------

    def _on_request(
        self, req: Request, raw: bytes | None = None, end: EndOfMessage | None = None, rules=None
    ) -> None:
        """`end`: the request is already complete (no body), so it starts as such. `raw`: the
        read was exactly this head, as it came (with `end`, it may be remembered)."""
        if rules is None:
            rules = self.ctx.rules()
        decision = decide(rules, req)
        if raw is not None and end is not None and end.keep_alive and not req.upgrade:
            if not decision.status and not req.has_body:
                remember(rules, raw, decision.req or req, decision)
        if decision.req is not None:
            # The policy decided on the normalized path (parsers/http_path.py), and the upstream
            # gets that same path in `decision.raw`: the two can't disagree about `/a/../b`.
            if decision.status:
                self._on_parse_error(ParseError(decision.status, "bad request target"))
                return
            req = decision.req
        if req.upgrade and decision.allowed and not req.has_body and not self.queue:
            # h2c Upgrade: HTTP/2 stays HTTP/2 upstream, so the connection is handed to the
            # HTTP/2 session (at the Upgrade event that follows) instead of being forwarded.
            # A denied one is answered 403 here like any request; a body-carrying one is
            # forwarded as an HTTP/1 upgrade as before.
            from l7proxy.http2.upgrade import wants_h2c

            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.headers]
            if wants_h2c(headers):
                self.h2c = (req, headers, decision, raw)
                self.parsing = None
                return
        self.pm.received.value += 1  # (Counter child: .inc() without the call, per request)
        ex = Exchange(req, decision.allowed, decision.raw or raw, _monotonic())
        if decision.logged:
            ex.logged = decision.logged
        if end is not None:
            ex.complete = True
            if not end.keep_alive or self.draining:
                ex.keep_alive = False
                self.pause_client_reading(PauseReason.REQUEST_QUEUE)
        self.parsing = ex
        queue = self.queue
        queue.append(ex)
        if len(queue) == 1:
            self._start(ex)
        elif len(queue) > self.cfg.http1_max_pipeline:
            self.pause_client_reading(PauseReason.REQUEST_QUEUE)

    def _on_data(self, data: bytes) -> None:
        ex = self.parsing
        if ex is None or not ex.allowed:
            return  # a denied request's body is read and dropped
        chunks = encode_chunk(data) if ex.req.chunked else (data,)
        if ex.sent:
            up = self.upstream
            if up is not None:
                up.transport.writelines(chunks)
                self.deadline = _monotonic() + self.cfg.idle_timeout  # the upload progresses
        else:
            # Waiting behind another request (or for the upstream connection): held, and the
            # client is paused once a high-water mark of it is held.
            if ex.pending is None:
                ex.pending = []
            ex.pending.extend(chunks)
            if sum(map(len, ex.pending)) > self.cfg.write_high_water:
                self.pause_client_reading(PauseReason.REQUEST_QUEUE)

    def _on_end(self, ev: EndOfMessage) -> None:
        ex = self.parsing
        if ex is None:
            return
        ex.complete = True
        ex.keep_alive = ev.keep_alive and not self.draining
        if ex.allowed and ex.req.chunked:
            tail = last_chunk(ev.trailers)
            if ex.sent and self.upstream is not None:
                self.upstream.transport.write(tail)
            else:
                if ex.pending is None:
                    ex.pending = []
                ex.pending.append(tail)
        if not ex.keep_alive:
            # Nothing after a closing request is read; the connection ends with its answer.
            self.pause_client_reading(PauseReason.REQUEST_QUEUE)
        if ex.answered and self.queue and self.queue[0] is ex:
            self._finish(ex)
        elif ex.sent and self.queue and self.queue[0] is ex:
            self._await_response(_monotonic() if ex.req.has_body else ex.start)

    def _on_parse_error(self, err: ParseError) -> None:
        self.pm.parse_errors.inc()
        front = self.queue[0] if self.queue else None
        if front is not None and front is self.parsing and not front.complete:
            # The body of the request in flight broke (say, a bad chunk size): what went
            # upstream stays a cut-off request on a connection that is closed now.
            up = self.upstream
            self.upstream = None
            if self.connecting is not None:
                self.connecting.cancel()
            if up is not None:
                up.close()
                if up.got_bytes:
                    self._close()
                    return
            self.queue.pop(0)
        ex = Exchange(None, False, None, _monotonic())
        ex.error = err
        ex.complete = True
        ex.keep_alive = False
        self.parsing = None
        self.queue.append(ex)
        self.pause_client_reading(PauseReason.REQUEST_QUEUE)
        if len(self.queue) == 1:
            self._start(ex)

    def _on_upgrade(self, rest: bytes) -> None:
        if self.h2c is not None:
            self._take_over_h2c(rest)
            return
        ex = self.parsing
        if ex is not None and ex.allowed and not ex.answered:
            # Hold everything after the head until the upstream says 101 (or 2xx to CONNECT).
            self.upgrade_wait = ex
            if rest:
                self.upgrade_buffer.append(rest)
            self.pause_client_reading(PauseReason.UPGRADE)  # what follows is held, so bounded
            return
        # Denied (answered in place): keep speaking HTTP.
        self._handle(self.parser.resume(rest))

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
            self.closed = True  # the transport belongs to the HTTP/2 session now
            self.deadline_kind = NO_DEADLINE
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

    # ---- driving the queue -------------------------------------------------------------------

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
        up.max_head = self.cfg.max_response_header_bytes
        head = ex.raw or head_bytes(ex.req)
        if ex.pending:
            up.transport.writelines([head, *ex.pending])
            ex.pending = None
        else:
            up.transport.write(head)
        if ex.complete:
            self._await_response(ex.start)
        else:
            # The body is still coming (paced by backpressure): the response clock starts when
            # it ends; meanwhile a client that stops sending is cut after the idle timeout.
            self._set_deadline(IDLE, self.cfg.idle_timeout)

    def _await_response(self, since: float) -> None:
        timeout = self.cfg.upstream_response_timeout
        if timeout:
            self.deadline_kind = RESPONSE
            self.deadline = since + timeout
        else:
            self.deadline_kind = NO_DEADLINE

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
        self._next()

    # ---- responses (called by UpstreamConn) --------------------------------------------------

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
        if self.upgrade_wait is ex:
            # The upstream refused the upgrade: go back to parsing what the client sent.
            self.upgrade_wait = None
            buffered = b"".join(self.upgrade_buffer)
            self.upgrade_buffer = []
            self.resume_client_reading(PauseReason.UPGRADE)
            self._handle(self.parser.resume(buffered))
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
        if self.upgrade_wait is ex:
            # An upgrade that will not happen: what the client sent after it is HTTP again.
            self.upgrade_wait = None
            buffered = b"".join(self.upgrade_buffer)
            self.upgrade_buffer = []
            self.resume_client_reading(PauseReason.UPGRADE)
            self._handle(self.parser.resume(buffered))
        self._next()

    def on_tunnel(self) -> None:
        """101 Switching Protocols (or 2xx to CONNECT): from now on both sides are raw bytes."""
        ex = self.queue.pop(0) if self.queue else None
        self.tunnel = True
        self.deadline_kind = NO_DEADLINE
        self.upgrade_wait = None
        if ex is not None and self.ctx.flows.active:
            emit_flow(self.ctx, ex, FORWARDED, _monotonic())
        if self.upgrade_buffer:
            self.upstream.transport.writelines(self.upgrade_buffer)
            self.upgrade_buffer = []
        self.resume_client_reading(PauseReason.REQUEST_QUEUE | PauseReason.UPGRADE)

    def on_upstream_lost(self, up: UpstreamConn, why: str) -> None:
        if up is not self.upstream:
            return
        self.upstream = None
        if self.closed:
            return
        if self.tunnel:
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
        if up.reused and ex.req.method in (b"GET", b"HEAD", b"OPTIONS") and not ex.req.has_body:
            # A pooled connection closed by the upstream as we reused it: retry once, fresh.
            ex.sent = False
            self._connect(ex)
            return
        self._upstream_failed(ex, 503, "reset")

    # ---- helpers -----------------------------------------------------------------------------

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
            if self.draining:
                self._close()
                return
        if (
            self.paused
            and len(self.queue) <= self.cfg.http1_max_pipeline // 2
            and self.upgrade_wait is None
        ):
            last = self.parsing
            if last is None or last.keep_alive:
                self.resume_client_reading(PauseReason.REQUEST_QUEUE)

    def _set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = _monotonic() + seconds

    def on_deadline(self) -> None:
        """Called by the sweeper when `deadline` passed."""
        kind = self.deadline_kind
        self.deadline_kind = NO_DEADLINE
        if self.closed:
            return
        if kind == HEAD:
            self.pm.parse_errors.inc()
            self.transport.write(simple_response(408, b"request timeout\r\n", close=True))
            self._close()
        elif kind == RESPONSE:
            ex = self.queue[0] if self.queue else None
            up = self.upstream
            if up is not None and up.got_bytes:
                return  # the response started in time; its body may take as long as it takes
            if ex is not None:
                self.pm.upstream_timeout.inc()
                self.transport.write(simple_response(504, b"upstream timeout\r\n", close=True))
                ex.status = 504
                emit_error_flow(self.ctx, ex, 504, "UPSTREAM_TIMEOUT")
            self._close()
        elif kind == IDLE:
            self._close()
        elif kind == PARK:
            self._park()

    def _park(self) -> None:
        """Idle since `deadline - upstream_park_after`: the upstream connection goes back to the
        pool (the next request takes one from there), and the idle clock runs on."""
        cfg = self.cfg
        up = self.upstream
        if up is not None and not self.queue and not self.tunnel and self.connecting is None:
            self.upstream = None
            self.pool.release(up)
        self.deadline_kind = IDLE
        self.deadline += cfg.idle_timeout - cfg.upstream_park_after

    def drain(self) -> None:
        """SIGTERM: finish the request in flight, then close; idle connections close now."""
        self.draining = True
        if not self.queue and self.parser.idle and not self.tunnel:
            self._close()

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.deadline_kind = NO_DEADLINE
        up = self.upstream
        self.upstream = None
        if up is not None:
            if not self.queue and not self.tunnel and not up.closed and not self.upgrade_wait:
                self.pool.release(up)
            else:
                up.close()
        self.transport.close()


def make_session(ctx, first_bytes: bytes = b"") -> Http1Session:
    """Protocol-registry entry point (see l7proxy/protocols.py)."""
    return Http1Session(ctx, sweeper=getattr(ctx, "sweeper", None))
