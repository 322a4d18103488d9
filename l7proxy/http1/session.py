"""The HTTP/1.1 client session: parse, ask the policy, forward or answer, in order.

One `Http1Session` per client connection. Requests are handled one at a time towards the
upstream: pipelined requests wait in `queue` (with their bodies, bounded by pausing the client),
so responses — including a 403 in place of a denied request — go back in request order without
ever splitting an upstream read. Response bytes go to the client unchanged; request heads are
rebuilt from the parsed form (so nothing ambiguous reaches the upstream) and chunked bodies are
re-framed.

This module reads the client: the fast path for a read identical to an earlier request, the
parser's events, and the queue they fill. The session is split by idea into mixins: sending the
request in flight and taking its answer (forwarding.py), upgrades and h2c (upgrades.py), its
deadlines, drain and close (lifetime.py); its state is one table (states.py).

Backpressure: each transport pauses the other side's reading when its write buffer passes the
high water mark (`pause_client_reading(PauseReason...)`, l7proxy/session.py: several causes
combine). Timeouts: one deadline per session, checked by the worker's `DeadlineSweeper`.
"""

from __future__ import annotations

import asyncio
import time

from l7proxy.http1.bodies import SplicedBodies, request_content_length
from l7proxy.http1.exchange import Exchange
from l7proxy.http1.forwarding import Forwarding
from l7proxy.http1.lifetime import HEAD, IDLE, Lifetime
from l7proxy.http1.states import (
    CLOSE,
    DRAINING,
    HANDED_OFF,
    OPEN,
    TRANSITIONS,
    TUNNEL,
    UPGRADING,
    UPGRADING_DRAINING,
    Input,
)
from l7proxy.http1.upgrades import Upgrades
from l7proxy.http1.upstream import UpstreamConn, UpstreamPool
from l7proxy.http1.verdicts import decide, recall, remember
from l7proxy.protocols import worker_upstreams
from l7proxy.session import NO_DEADLINE, PauseReason, Session, next_state
from parsers.http1 import (
    Data,
    EndOfMessage,
    ParseError,
    Request,
    RequestParser,
    Upgrade,
    encode_chunk,
    last_chunk,
    simple_response,
)

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


class Http1Session(Forwarding, Upgrades, Lifetime, SplicedBodies, Session):
    # Slots: an idle keep-alive connection costs memory, not CPU (10,000 of them in the bench).
    __slots__ = (
        "ctx", "cfg", "pm", "pool", "sweeper", "parser", "queue", "parsing", "upstream", "state",
        "upgrade_buffer", "connecting", "deny_bytes", "deny_close_bytes", "h2c", "pumps",
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
        self.state = OPEN
        self.upgrade_buffer: list[bytes] = []  # held while UPGRADING
        self.connecting: asyncio.Task | None = None
        self.deny_bytes, self.deny_close_bytes = _deny_responses(cfg.deny_message)
        self.h2c: tuple | None = None  # an allowed h2c Upgrade waiting for its Upgrade event
        self.pumps: set | None = None  # bodies being spliced (bodies.py)

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
        state = self.state
        if state is not OPEN:
            if state is TUNNEL:
                self.upstream.transport.write(data)
                return
            if state is UPGRADING or state is UPGRADING_DRAINING:
                self.upgrade_buffer.append(data)
                return
        parser = self.parser
        if not self.queue:
            rules = self.ctx.rules()
            known = recall(rules, data)
            if known is not None and parser.idle and state is OPEN:
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
        elif self.parsing is not None and self.parsing.body_left:
            # A large Content-Length body goes on (bodies.py). If it is spliced this parser is
            # dropped, and its last event list (this read's body) would live on with it in a
            # reference cycle until a full GC: 28 MiB more RSS under the upload bench.
            events.clear()
            self._splice_request_body()

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
        tunnel = self.state is TUNNEL
        self._close_pumps()  # their dup()s would keep both sockets open
        self._to(CLOSE)
        self.pm.active.dec()
        if self.sweeper is not None:
            self.sweeper.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
        up = self.upstream
        self.upstream = None
        if up is not None:
            if not self.queue and not tunnel and not up.closed:
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
            if self.pumps and self._pumping_response():
                return  # the upstream is read by the pump, not the transport

            up.transport.resume_reading()

    # ---- requests ----------------------------------------------------------------------------

    def _on_request(
        self, req: Request, raw: bytes | None = None, end: EndOfMessage | None = None, rules=None
    ) -> None:
        """`end`: the request is already complete (no body), so it starts as such. `raw`: the
        read was exactly this head, as it came (with `end`, it may be remembered)."""
        if rules is None:
            rules = self.ctx.rules()
        decision = decide(rules, req, self.cfg.path_escaped_slashes)
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
        if req.has_body and decision.allowed and not req.chunked and not req.upgrade:
            if self.cfg.http1_splice_min_body:
                ex.body_left = max(0, request_content_length(req.headers))
        if end is not None:
            ex.complete = True
            if not end.keep_alive or self.state is DRAINING:
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
        if ex.body_left:
            ex.body_left -= len(data)
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
        ex.keep_alive = ev.keep_alive and self.state is not DRAINING
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

    # ---- the one place the connection's state changes (l7proxy/http1/states.py) ------------

    def _to(self, event: Input) -> None:
        state = self.state = next_state(TRANSITIONS, self.state, event, "HTTP/1")
        if state >= TUNNEL:
            self.deadline_kind = NO_DEADLINE  # a tunnel has no deadline; a closed one neither
            if state >= HANDED_OFF:
                self.closed = True  # (the Session contract's flag, kept in step with the state)


def make_session(ctx, first_bytes: bytes = b"") -> Http1Session:
    """Protocol-registry entry point (see l7proxy/protocols.py)."""
    return Http1Session(ctx, sweeper=ctx.sweeper)
