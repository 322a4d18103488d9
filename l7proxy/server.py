"""Listeners, the accept gate (L3/L4 verdict, sniffing, hand-off), deadlines, workers, signals.

`Gate` is the protocol of every freshly accepted connection. It asks the listener for the L3/L4
verdict of the source (a deny resets the connection before a byte is read), builds the
`ConnContext`, picks the protocol (fixed, or sniffed from the first bytes with `--protocol auto`)
and hands the transport to that protocol's session (see l7proxy/protocols.py).

Workers: with `--workers N` the main process binds every port (SO_REUSEPORT, not listening) to
learn and hold it, forks N workers that each listen on their own SO_REUSEPORT socket (the kernel
spreads connections), forwards SIGTERM/SIGHUP to them and exits when they have all exited.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from l7proxy import protocols
from l7proxy.config import ProxyConfig
from l7proxy.context import ConnContext, OriginalDestination
from l7proxy.log import log
from l7proxy.session import Session

_DEFAULTS = ProxyConfig()


class DeadlineSweeper:
    """One periodic pass over the sessions instead of a timer per request: a session sets
    `deadline` (monotonic seconds) and `deadline_kind` (NO_DEADLINE = none) and gets
    `on_deadline()` (the contract in l7proxy/session.py)."""

    def __init__(self, interval: float = _DEFAULTS.sweep_interval) -> None:
        self.interval = interval
        self.sessions: set[Session] = set()
        # What the sessions of this worker share, by protocol (l7proxy/kafka/worker.py).
        self.shared: dict[str, object] = {}
        self._handle: asyncio.TimerHandle | None = None

    def add(self, session: Session) -> None:
        self.sessions.add(session)

    def discard(self, session: Session) -> None:
        self.sessions.discard(session)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(self.interval, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _tick(self) -> None:
        now = time.monotonic()
        for session in list(self.sessions):
            if session.deadline_kind and session.deadline <= now:
                try:
                    session.on_deadline()
                except Exception as exc:  # one broken session never stops the sweeper
                    log(f"deadline handler failed: {exc!r}")
        self._handle = asyncio.get_running_loop().call_later(self.interval, self._tick)


def reset(transport) -> None:
    """Close with RST (SO_LINGER 0): an L3/L4 deny looks like a drop to the client."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


@dataclass(slots=True, kw_only=True)
class Listener:
    """Everything a Gate needs for one listening port (built by the gateway or the agent)."""

    port: int
    protocol: str
    destination: Callable  # DestinationResolver: (transport) -> OriginalDestination
    classify: Callable  # (ip) -> L4Decision(action, identity, labels, reason)
    rules_for: Callable  # (ip) -> callable returning the current rule set
    endpoint: Callable  # () -> (identity, labels) of the protected endpoint
    config: ProxyConfig
    flows: object  # FlowSink
    metrics: object  # ProxyMetrics
    sweeper: DeadlineSweeper
    upstreams: object  # protocols.worker_upstreams(config)
    direction: str = "INGRESS"


class Gate(asyncio.Protocol):
    __slots__ = ("lst", "transport", "ctx", "buf")

    def __init__(self, listener: Listener) -> None:
        self.lst = listener
        self.transport = None
        self.ctx = None
        self.buf = b""

    def connection_made(self, transport) -> None:
        lst = self.lst
        self.transport = transport
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        ip, port = peer[0], peer[1]
        if len(lst.sweeper.sessions) >= lst.config.max_connections:
            transport.abort()
            return
        decision = lst.classify(ip)
        ep_identity, ep_labels = lst.endpoint()
        dest = lst.destination(transport)
        ctx = ConnContext(
            config=lst.config,
            client=(ip, port),
            listener_port=lst.port,
            destination=dest,
            source_identity=decision.identity,
            source_labels=decision.labels,
            destination_identity=ep_identity,
            destination_labels=ep_labels,
            rules=lst.rules_for(ip),
            flows=lst.flows,
            metrics=lst.metrics,
            proto=lst.protocol if lst.protocol != "auto" else "http",
            direction=lst.direction,
            upstreams=lst.upstreams,
            sweeper=lst.sweeper,
        )
        if decision.action == "deny":
            lst.metrics.l4_drops.inc()
            if lst.flows.active:
                lst.flows.emit(
                    ctx.flow(
                        "DROPPED",
                        None,
                        f"TCP {ip}:{port} -> :{lst.port} policy denied",
                        drop_reason="POLICY_DENIED",
                        event_type="L3_L4",
                    )
                )
            reset(transport)
            return
        self.ctx = ctx
        if lst.protocol != "auto":
            self._hand_off(lst.protocol, b"")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        try:
            name = protocols.sniff(self.buf, self.lst.config.sniff_max_kafka_frame)
        except ValueError:
            self.lst.metrics.for_proto("unknown").parse_errors.inc()
            self.transport.close()
            return
        if name is None:
            if len(self.buf) > self.lst.config.sniff_max_bytes:
                self.transport.close()
            return
        self._hand_off(name, self.buf)

    def _hand_off(self, name: str, first: bytes) -> None:
        ctx = self.ctx.for_proto(name)
        pm = ctx.proto_metrics
        pm.accepted.inc()
        pm.active.inc()
        try:
            session = protocols.make_session(name, ctx, first)
        except Exception as exc:
            log(f"no {name} session: {exc!r}")
            pm.active.dec()
            self.transport.close()
            return
        transport = self.transport
        self.transport = None
        transport.set_protocol(session)
        session.connection_made(transport)
        if first:
            session.data_received(first)

    def connection_lost(self, exc) -> None:
        self.transport = None


def bind(
    host: str, port: int, listen: bool, backlog: int = 4096, reuseport: bool = True
) -> socket.socket:
    """A TCP socket on host:port. SO_REUSEPORT only for workers sharing a port: a single
    worker should fail on a port another process holds, not split its traffic."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(backlog)
    sock.setblocking(False)
    return sock


def static_destination(host: str, port: int):
    dest = OriginalDestination(host, port)
    return lambda transport: dest


def install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass


def run_forked(n: int, child, on_ready) -> int:
    """Fork `n` children running `child(index, ready_fd)`; each writes one byte to ready_fd when
    it listens. Forward SIGTERM/SIGINT/SIGHUP; return the worst exit code."""
    read_fd, write_fd = os.pipe()
    pids = []
    for index in range(n):
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            code = 1
            try:
                code = child(index, write_fd)
            finally:
                os._exit(code)
        pids.append(pid)
    os.close(write_fd)

    def forward(signum, frame):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    got = 0
    while got < n:
        chunk = os.read(read_fd, n - got)
        if not chunk:
            break
        got += len(chunk)
    os.close(read_fd)
    if got == n:
        on_ready()
    worst = 0
    for pid in pids:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        worst = max(worst, os.waitstatus_to_exitcode(status) & 0xFF)
    return worst
