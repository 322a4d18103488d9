"""The HTTP/2 client session: one client connection, one upstream HTTP/2 connection, a relay.

All protocol logic lives in the sans-IO `parsers.http2.H2Relay`; this module only moves bytes,
opens the upstream, applies backpressure, turns relay events into flows and metrics, and keeps
the connection's one deadline (a 1-second tick through the worker's `DeadlineSweeper`) that
refills the relay's flood budgets and closes idle connections.

Backpressure: when the client's transport buffers more than the high water mark, reading stops
on both sides (the upstream, whose frames would pile up, and the client, whose frames produce
answers such as PING ACKs and 403s); when the upstream's transport is full, client reading stops.
Data is never acknowledged by the proxy: WINDOW_UPDATEs come from the real receiver.
"""

from __future__ import annotations

import asyncio
import time

from l7proxy.flows import DROPPED, FORWARDED
from l7proxy.http2.flows import InFlight, emit_connection_error, emit_rejected, emit_stream_flow
from l7proxy.http2.policy import H2Policy, limits_from_config
from l7proxy.http2.states import ABORT, CLOSE, CLOSING, LOST, OPEN, TRANSITIONS, Input
from l7proxy.log import log
from l7proxy.session import NO_DEADLINE, PauseReason, Session, next_state
from parsers.http2 import (
    ConnectionFailed,
    H2Relay,
    PrefaceReceived,
    RequestReceived,
    RequestRejected,
    StreamEnded,
)
from parsers.http2.frames import ERROR_NAMES

# The deadline's period: the relay's flood budgets are refilled per second, and the idle and
# preface timeouts are checked at this resolution.
TICK = 1.0
# Deadline kinds: the tick while OPEN, the close grace while CLOSING (states.py).
TICKING, CLOSE_GRACE = 1, 2

_monotonic = time.monotonic


class _Upstream(asyncio.Protocol):
    """The server side: bytes go to the session's relay."""

    __slots__ = ("session", "transport", "closed")

    def __init__(self, session: H2Session) -> None:
        self.session = session
        self.transport = None
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.session.upstream_data(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.session.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_client_reading(PauseReason.UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.session.resume_client_reading(PauseReason.UPSTREAM_FULL)


class H2Session(Session):
    def __init__(self, ctx, relay: H2Relay | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.cfg = ctx.config
        self.pm = ctx.proto_metrics
        self.sweeper = ctx.sweeper
        self.policy = H2Policy(ctx)
        self.relay = relay or H2Relay(
            self.policy.decide, self.policy.epoch, limits_from_config(ctx.config)
        )
        self.upstream: _Upstream | None = None
        self.connecting: asyncio.Task | None = None
        self.pending_upstream: list[bytes] = []
        self.pending_bytes = 0
        self.inflight: dict[int, InFlight] = {}
        self.state = OPEN
        self.upstream_paused = False
        self.activity = True
        self.idle_since = self.started = _monotonic()

    # ---- asyncio: client side ----------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(self.cfg.write_high_water, self.cfg.write_low_water)
        if self.sweeper is not None:
            self.sweeper.add(self)
        self.deadline_kind = TICKING
        self.deadline = _monotonic() + TICK

    def data_received(self, data: bytes) -> None:
        self._relay(self.relay.receive_client, data)

    def eof_received(self):
        self._close()
        return False

    def connection_lost(self, exc) -> None:
        if not self.closed:
            self._close_upstream()
        self._to(LOST)
        self.pm.active.dec()
        if self.sweeper is not None:
            self.sweeper.discard(self)
        if self.connecting is not None:
            self.connecting.cancel()
        self.inflight.clear()

    def pause_writing(self) -> None:
        self.pause_client_reading(PauseReason.CLIENT_FULL)
        up = self.upstream
        if up is not None and up.transport is not None and not up.closed:
            up.transport.pause_reading()
            self.upstream_paused = True

    def resume_writing(self) -> None:
        self.resume_client_reading(PauseReason.CLIENT_FULL)
        up = self.upstream
        if self.upstream_paused and up is not None and not up.closed:
            self.upstream_paused = False
            up.transport.resume_reading()

    # ---- upstream ----------------------------------------------------------------------------

    def _connect(self) -> None:
        if self.connecting is not None or self.upstream is not None:
            return
        self.pause_client_reading(PauseReason.CONNECTING)
        self.connecting = asyncio.get_running_loop().create_task(self._open_upstream())

    async def _open_upstream(self) -> None:
        dest = self.ctx.destination
        loop = asyncio.get_running_loop()
        try:
            _, up = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self), dest.host, dest.port),
                self.cfg.upstream_connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            self.connecting = None
            kind = "timeout" if isinstance(exc, TimeoutError) else "refused"
            getattr(self.pm, f"upstream_{kind}").inc()
            if not self.closed:
                emit_connection_error(self.ctx, f"UPSTREAM_{kind.upper()}")
                self._handle(self.relay.upstream_failed(f"upstream {kind}"))
                self._flush()
            return
        self.connecting = None
        if self.closed:
            up.transport.close()
            return
        up.transport.set_write_buffer_limits(self.cfg.write_high_water, self.cfg.write_low_water)
        self.upstream = up
        if self.pending_upstream:
            up.transport.writelines(self.pending_upstream)
            self.pending_upstream = []
            self.pending_bytes = 0
        self.resume_client_reading(PauseReason.CONNECTING)
        self._flush()

    def upstream_data(self, data: bytes) -> None:
        self._relay(self.relay.receive_server, data)

    def _relay(self, receive, data: bytes) -> None:
        """Bytes from either side through the relay, then what it has to send both ways."""
        self.activity = True
        try:
            events = receive(data)
            if events:
                self._handle(events)
            self._flush()
        except Exception as exc:  # a bug closes this connection, never the worker
            self._crash(exc)

    def _crash(self, exc: Exception) -> None:
        log(f"http2 {self.ctx.client_ip}:{self.ctx.client_port}: closing after {exc!r}")
        self.pm.parse_errors.inc()
        self._to(ABORT)
        up = self.upstream
        self.upstream = None
        if up is not None and not up.closed:
            up.closed = True
            up.transport.abort()
        if self.transport is not None:
            self.transport.abort()

    def upstream_lost(self, exc) -> None:
        self.upstream = None
        if self.closed:
            return
        if exc is not None:
            self.pm.upstream_reset.inc()
        self._handle(self.relay.server_closed())
        self._flush()

    def _close_upstream(self) -> None:
        up = self.upstream
        self.upstream = None
        if up is not None and not up.closed:
            up.closed = True
            up.transport.close()

    # ---- moving bytes ------------------------------------------------------------------------

    def _flush(self) -> None:
        relay = self.relay
        out = relay.data_to_client()
        if out and not self.closed:
            self.transport.write(out)
        out = relay.data_to_server()
        if out:
            up = self.upstream
            if up is not None and not up.closed:
                up.transport.write(out)
            elif not self.closed:
                self.pending_upstream.append(out)
                self.pending_bytes += len(out)
                if self.pending_bytes > self.cfg.write_high_water:
                    self.pause_client_reading(PauseReason.CONNECTING)
        if relay.closed and not self.closed:
            self._close()

    def _close(self) -> None:
        """Close both connections after what is buffered has been written (GOAWAY included)."""
        if self.closed:
            return
        self._to(CLOSE)
        self._close_upstream()
        if self.transport is not None:
            self.transport.close()

    def on_deadline(self) -> None:
        """The sweeper's callback: a 1-second tick, or the grace period of a close ran out."""
        now = _monotonic()
        if self.state is CLOSING:
            self._to(ABORT)
            if self.transport is not None:
                self.transport.abort()
            return
        self.relay.tick()
        if self.relay.awaiting_preface and now - self.started >= self.cfg.header_timeout:
            self._close()  # a client that never completes its preface (slowloris)
            return
        if self.activity or self.relay.active_streams:
            # Streams in flight are never cut by the idle timer (long-lived gRPC streams).
            self.activity = False
            self.idle_since = now
        elif now - self.idle_since >= self.cfg.idle_timeout:
            self.relay.drain()
        self._flush()
        if not self.closed:
            self.deadline_kind = TICKING
            self.deadline = now + TICK

    def start_upgraded(self, headers, body: bytes, settings_payload: bytes) -> None:
        """h2c Upgrade: the HTTP/1.1 request is stream 1 (see l7proxy/http2/upgrade.py)."""
        self.activity = True
        events = self.relay.start_upgraded(headers, body, settings_payload)
        self._connect()
        if events:
            self._handle(events)
        self._flush()

    def drain(self) -> None:
        """SIGTERM: GOAWAY to the client; streams in flight finish, then the connection closes."""
        if not self.closed:
            self.relay.drain()
            self._flush()

    def close(self) -> None:
        self._close()

    def _to(self, event: Input) -> None:
        """The one place the connection's state changes (l7proxy/http2/states.py)."""
        state = self.state = next_state(TRANSITIONS, self.state, event, "HTTP/2")
        if state is not OPEN:
            self.closed = True  # (the Session contract's flag, kept in step with the state)
            if state is CLOSING:
                # A client that never reads would keep the buffered bytes forever: abort later.
                self.deadline_kind = CLOSE_GRACE
                self.deadline = _monotonic() + self.cfg.h2_close_grace
            else:
                self.deadline_kind = NO_DEADLINE

    # ---- relay events: metrics and flows -----------------------------------------------------

    def _handle(self, events) -> None:
        pm = self.pm
        inflight = self.inflight
        for ev in events:
            cls = ev.__class__
            if cls is RequestReceived:
                pm.received.inc()
                allowed = ev.decision.allowed
                if allowed:
                    pm.forwarded.inc()
                    inflight[ev.stream_id] = InFlight(_monotonic(), ev.request, ev.decision.logged)
                else:
                    pm.denied.inc()
                    if self.ctx.flows.active:
                        item = InFlight(_monotonic(), ev.request, ())
                        item.status = 200 if ev.request.is_grpc else 403
                        emit_stream_flow(
                            self.ctx, item, DROPPED, "7" if ev.request.is_grpc else None
                        )
            elif cls is StreamEnded:
                item = inflight.pop(ev.stream_id, None)
                if item is not None:
                    item.status = ev.status
                    pm.duration.observe(_monotonic() - item.start)
                    if self.ctx.flows.active:
                        emit_stream_flow(self.ctx, item, FORWARDED, ev.grpc_status, ev)
            elif cls is RequestRejected:
                pm.received.inc()
                pm.parse_errors.inc()
                if self.ctx.flows.active:
                    emit_rejected(self.ctx, ev)
            elif cls is ConnectionFailed:
                if ev.side == "client":
                    pm.parse_errors.inc()
                log(
                    f"http2 {self.ctx.client_ip}:{self.ctx.client_port}: {ev.side} "
                    f"{ERROR_NAMES.get(ev.error_code, ev.error_code)}: {ev.reason}"
                )
            elif cls is PrefaceReceived:
                self._connect()


def make_session(ctx, first_bytes: bytes = b"") -> H2Session:
    """Protocol-registry entry point (see l7proxy/protocols.py)."""
    return H2Session(ctx)
