"""How long an HTTP/1 client connection lives and how it ends: its one deadline (waiting for a
request head, for the upstream's answer, idle, or idle while still holding an upstream
connection), the SIGTERM drain and the close. A mixin of `Http1Session`."""

from __future__ import annotations

import time

from l7proxy.http1.exchange import emit_error_flow
from l7proxy.http1.states import CLOSE, DRAIN, DRAINING, TUNNEL
from l7proxy.session import NO_DEADLINE
from parsers.http1 import simple_response

# Deadline kinds (the session's `deadline_kind`; NO_DEADLINE = none). PARK: idle, still holding
# an upstream connection (given back at the deadline, then IDLE runs on from the same start).
IDLE, HEAD, RESPONSE, PARK = 1, 2, 3, 4

_monotonic = time.monotonic


class Lifetime:
    __slots__ = ()

    def _set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = _monotonic() + seconds

    def _await_response(self, since: float) -> None:
        timeout = self.cfg.upstream_response_timeout
        if timeout:
            self.deadline_kind = RESPONSE
            self.deadline = since + timeout
        else:
            self.deadline_kind = NO_DEADLINE

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
        if (
            up is not None
            and not self.queue
            and self.connecting is None
            and self.state is not TUNNEL
        ):
            self.upstream = None
            if self.pumps:
                self._stop_response_wait()  # (bodies.py) a pooled connection must be read
            self.pool.release(up)
        self.deadline_kind = IDLE
        self.deadline += cfg.idle_timeout - cfg.upstream_park_after

    def drain(self) -> None:
        """SIGTERM: finish the request in flight, then close; idle connections close now."""
        self._to(DRAIN)
        if self.state is DRAINING and not self.queue and self.parser.idle:
            self._close()

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        speaks_http = self.state <= DRAINING  # not upgrading nor a tunnel (see states.py)
        self._close_pumps()  # (bodies.py) before the sockets they hold go
        self._to(CLOSE)
        up = self.upstream
        self.upstream = None
        if up is not None:
            if not self.queue and speaks_http and not up.closed:
                self.pool.release(up)
            else:
                up.close()
        self.transport.close()
