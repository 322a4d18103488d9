"""The Kafka protocol session: one client connection, one upstream connection, a KafkaLayer
in between. This module only moves bytes and carries out the layer's commands.

Backpressure: when either transport's write buffer passes the high water mark, reading from the
other side pauses until it drains.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
import time
import weakref

from l7proxy.flows import DROPPED, ERROR, FORWARDED
from l7proxy.kafka.commands import (
    Close,
    KafkaSettings,
    Record,
    ResolveTopicIds,
    ToClient,
    ToUpstream,
)
from l7proxy.kafka.layer import KafkaLayer
from l7proxy.kafka.resolve import shared_lookup
from l7proxy.kafka.settings import settings_for
from parsers.kafka.apis import api_name

_VERDICTS = {"FORWARDED": FORWARDED, "DROPPED": DROPPED, "ERROR": ERROR}
# Requests in flight on one connection before the proxy stops reading the client.
MAX_IN_FLIGHT = 1024
# The rest of a cut-through request at least this large moves client -> broker with splice(2)
# through a pipe, in the kernel: no copy into Python objects and back (see docs/kafka.md).
SPLICE_MIN = 64 * 1024
_PIPE_SIZE = 1024 * 1024
# After a spliced request: the next request's head, enough for the topics of a usual Produce
# (a head whose topics do not fit goes back to the transport). 16 KiB copied 14 KiB more of each
# body through Python: proxy CPU 0.51-0.53 -> 0.46-0.48 us per message (docs/kafka.md).
HEAD_READ = 2 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_ATOMIC = 4096  # PIPE_BUF: a write this small into an empty pipe is whole


class _KafkaMetrics:
    """Kafka-only metrics next to the shared policy_l7_total{proto="kafka"}."""

    __slots__ = ("latency", "frame_errors", "response_errors", "topic_id_lookups", "_by_key")

    def __init__(self, registry) -> None:
        self.latency = registry.histogram(
            "l7proxy_kafka_request_duration_seconds",
            "Kafka request latency through the proxy, by API key",
            ("api_key",),
        )
        self.frame_errors = registry.counter(
            "l7proxy_kafka_connection_errors_total",
            "Kafka connections closed by the proxy, by reason (frame_too_large, ...)",
            ("reason",),
        )
        self.response_errors = registry.counter(
            "l7proxy_kafka_response_errors_total",
            "Non-zero error codes in broker responses (first per response), by API key and code",
            ("api_key", "error_code"),
        )
        self.topic_id_lookups = registry.counter(
            "l7proxy_kafka_topic_id_lookups_total",
            "Topic ids looked up with the broker because no Metadata seen here named them, by "
            "result (found, not_found, error)",
            ("result",),
        )
        self._by_key: dict[int, object] = {}

    def observe(self, api_key: int, seconds: float) -> None:
        child = self._by_key.get(api_key)
        if child is None:
            child = self._by_key[api_key] = self.latency.labels(api_key=api_name(api_key))
        child.observe(seconds)


# Keyed by the registry object itself (weakly): an id() key outlives its registry and a new
# registry at the same address would get counters bound to the dead one.
_metrics_by_registry: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _kafka_metrics(ctx) -> _KafkaMetrics:
    registry = ctx.metrics.registry
    metrics = _metrics_by_registry.get(registry)
    if metrics is None:
        metrics = _metrics_by_registry[registry] = _KafkaMetrics(registry)
    return metrics


class _Upstream(asyncio.Protocol):
    def __init__(self, session: KafkaSession) -> None:
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.upstream_data(data)

    def connection_lost(self, exc) -> None:
        self.session.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_client()

    def resume_writing(self) -> None:
        self.session.resume_client()


def _set_buffer(transport, option: int, size: int) -> None:
    sock = transport.get_extra_info("socket") if hasattr(transport, "get_extra_info") else None
    if size and sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            pass  # not a socket that takes it (e.g. a test pipe)


def _fd(transport) -> int:
    sock = transport.get_extra_info("socket") if hasattr(transport, "get_extra_info") else None
    return sock.fileno() if sock is not None else -1


class _Splicer:
    """Moves the body of a large, already allowed Produce from the client socket to the broker
    socket with splice(2) through a pipe, while the client transport is paused. The watchers
    sit on dup()s of the sockets, as the event loop refuses a second watcher on a transport's
    own descriptor. The watcher on the client socket stays registered from wait to wait and
    request to request (each add and remove costs a poll handle, an ioctl and epoll_ctl calls);
    it goes only for a wait on the broker side and when reading goes back to the transport."""

    __slots__ = (
        "session", "loop", "cfd", "ufd", "pr", "pw", "pipe_size", "in_pipe", "reading", "writing",
    )  # fmt: skip

    def __init__(self, session: KafkaSession, client_fd: int, upstream_fd: int) -> None:
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.cfd = os.dup(client_fd)
        self.ufd = os.dup(upstream_fd)
        self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.pipe_size = fcntl.fcntl(self.pw, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            self.pipe_size = 64 * 1024  # the default pipe works, in more calls
        self.in_pipe = 0
        self.reading = self.writing = False

    def pump(self) -> bool:
        """Move what can move now. True when the request is through (or the session closed).
        A short splice means the socket had no more bytes (or room) for now: the splicer waits
        then instead of calling again into EAGAIN, a BlockingIOError per call. (A short count
        with bytes left is only a wake-up more: the watchers are level-triggered.)"""
        session = self.session
        layer = session.layer
        if self.writing:
            self.loop.remove_writer(self.ufd)
            self.writing = False
        drained = False
        try:
            while True:
                if self.in_pipe:
                    try:
                        n = os.splice(self.pr, self.ufd, self.in_pipe, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = 0
                    self.in_pipe -= n
                    if self.in_pipe:  # the broker socket's buffer is full
                        self._watch_broker()
                        return False
                left = layer.request_bytes_left
                if not left:
                    return True
                if drained:
                    self.wait_for_client()
                    return False
                want = min(left, self.pipe_size)  # the pipe is empty here
                try:
                    n = os.splice(self.cfd, self.pw, want, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self.wait_for_client()
                    return False
                if n == 0:
                    session.client_eof_in_request()
                    return True
                drained = n < want
                layer.pass_request_bytes(n)
                session.spliced_bytes += n
                self.in_pipe += n
        except OSError as exc:
            session.splice_failed(exc)
            return True

    def put(self, data: bytes) -> bool:
        """Queue `data` in the (empty) pipe ahead of the body to come. False when it does not
        fit at once (the caller writes it through the transport instead)."""
        if self.in_pipe or len(data) > _PIPE_ATOMIC:
            return False
        try:
            n = os.write(self.pw, data)
        except OSError:
            return False
        self.in_pipe += n
        return True

    def wait_for_client(self) -> None:
        """Call back when the client socket is readable (the watcher may be there already)."""
        if not self.reading:
            self.loop.add_reader(self.cfd, self.session.splice_ready)
            self.reading = True

    def _watch_broker(self) -> None:
        """Call back when the broker socket takes more. The client watcher goes meanwhile: with
        bytes waiting on the client socket it would fire on every loop turn."""
        if self.reading:
            self.loop.remove_reader(self.cfd)
            self.reading = False
        self.loop.add_writer(self.ufd, self.session.splice_ready)
        self.writing = True

    def unwatch(self) -> None:
        """Drop the watchers (reading goes back to the transport, or the splicer closes)."""
        if self.reading:
            self.loop.remove_reader(self.cfd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.ufd)
            self.writing = False

    def close(self) -> None:
        self.unwatch()
        for fd in (self.cfd, self.ufd, self.pr, self.pw):
            os.close(fd)


class KafkaSession(asyncio.Protocol):
    def __init__(self, ctx, settings: KafkaSettings | None = None) -> None:
        self.ctx = ctx
        self.settings = settings or settings_for(ctx)
        self.layer = KafkaLayer(ctx.rules, self.settings, time.monotonic_ns)
        self.kmetrics = _kafka_metrics(ctx)
        self.client = None
        self.upstream = None
        self._queued: list[bytes] = []  # for upstream, until it is connected
        self._queued_bytes = 0
        self._connect_task = None
        self._closed = False
        self._last_counted = None
        self._draining = False
        self._holds: set[str] = set()  # reasons client reading is paused
        # The core's DeadlineSweeper (gateway/agent) tracks sessions for idle timeouts and drain.
        self.sweeper = getattr(ctx, "sweeper", None)
        self.deadline = 0.0
        self.deadline_kind = 0
        self._splicer: _Splicer | None = None
        self._splice_ok = hasattr(os, "splice")
        self._held_upstream: list | None = None  # see splice_ready
        self.spliced_bytes = 0  # request bytes moved with splice(2) (tests, diagnostics)
        self._lookup_task = None  # see ResolveTopicIds

    # ---- client side --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.client = transport
        st = self.settings
        transport.set_write_buffer_limits(st.write_high_water, st.write_low_water)
        _set_buffer(transport, socket.SO_RCVBUF, st.socket_buffer)
        if self.sweeper is not None:
            self.sweeper.add(self)
        self._arm_idle()
        self._connect_task = asyncio.ensure_future(self._connect())

    # ---- sweeper interface: idle timeout and drain -------------------------------------

    def _arm_idle(self) -> None:
        """Idle = no request in flight; the sweeper closes the connection after idle_timeout.
        Also bounds the requests in flight: past MAX_IN_FLIGHT the client is not read until half
        of them are answered."""
        in_flight = self.layer.in_flight
        if in_flight > MAX_IN_FLIGHT:
            self._hold("in_flight")
        elif in_flight <= MAX_IN_FLIGHT // 2 and self._holds:
            self._release("in_flight")
        if in_flight:
            self.deadline_kind = 0
        else:
            self.deadline_kind = 1
            self.deadline = time.monotonic() + self.ctx.config.idle_timeout
            if self._draining:
                self._close("drained", "gateway draining")

    def on_deadline(self) -> None:
        self._close("idle_timeout", "no request within the idle timeout")

    def drain(self) -> None:
        self._draining = True
        if not self.layer.in_flight:
            self._close("drained", "gateway draining")

    def close(self) -> None:
        self._close("closed", "closed by the proxy")

    def data_received(self, data: bytes) -> None:
        self._client_bytes(data)
        if self._can_splice():
            self._start_splice()

    def _client_bytes(self, data: bytes) -> None:
        if self.upstream is not None and self.layer.pass_request_bytes(len(data)):
            self.upstream.write(data)  # the middle of a large request already allowed
            return
        try:
            commands = self.layer.client_data(data)
        except Exception as exc:  # a bug in a layer closes this connection, never the process
            self._close("internal_error", repr(exc))
            return
        self._run(commands)
        self._arm_idle()

    # ---- splice: the body of a large Produce, in the kernel ------------------------------

    def _can_splice(self) -> bool:
        return (
            self._splice_ok
            and self.layer.request_bytes_left >= SPLICE_MIN
            and self.upstream is not None
            and not self._closed
            and not self.upstream.get_write_buffer_size()  # bytes queued before must go first
        )

    def _start_splice(self) -> None:
        if self._splicer is None:
            cfd, ufd = _fd(self.client), _fd(self.upstream)
            if cfd < 0 or ufd < 0:
                self._splice_ok = False
                return
            try:
                self._splicer = _Splicer(self, cfd, ufd)
            except OSError:
                self._splice_ok = False
                return
        self._hold("splice")
        self.splice_ready()

    def splice_ready(self) -> None:
        """Pump the spliced request; when it is through, read the next request's head here
        (HEAD_READ bytes), waiting for it if the client has not sent it yet, so that the
        transport's large read does not copy the next body into Python, and splice that body
        too. Reading goes back to the transport for anything else (a small request, EOF, an
        error, another reason to pause the client)."""
        splicer = self._splicer
        while not self._closed and splicer is not None:
            if not splicer.pump():
                return  # waiting for the client to send or the broker to read
            if self._closed or self._holds != {"splice"}:
                break
            try:
                data = os.read(splicer.cfd, HEAD_READ)
            except BlockingIOError:
                # Handing back to the transport here sent the first 256 KiB of nearly every
                # next request through Python (21 % of the bytes): wait for the head instead.
                splicer.wait_for_client()
                return
            except OSError:
                break  # an error the transport will see
            if not data:
                break  # end of stream: the transport reads it again
            # What the layer forwards from this head waits here: when the rest is spliced it
            # goes into the pipe ahead of the body, so the head and the first body bytes leave
            # in one send (one segment and one broker wake-up fewer per request).
            self._held_upstream = []
            try:
                self._client_bytes(data)
            finally:
                held, self._held_upstream = self._held_upstream, None
            if self._can_splice() and splicer.put(b"".join(held)):
                continue
            self._write_upstream(held)
            if not self._can_splice():
                break
        if splicer is not None:
            splicer.unwatch()  # reading goes back to the transport
        self._release("splice")

    def client_eof_in_request(self) -> None:
        self._close("client_eof", "client closed in the middle of a request")

    def splice_failed(self, exc: OSError) -> None:
        self._close("splice_error", repr(exc))

    def eof_received(self):
        if self.upstream is not None and not self._closed:
            self.upstream.write_eof()
        return True

    def connection_lost(self, exc) -> None:
        if self.sweeper is not None:
            self.sweeper.discard(self)
        self._drop_side_work()
        if not self._closed:
            self._closed = True
            if self.upstream is not None:
                self.upstream.close()
            if self._connect_task is not None:
                self._connect_task.cancel()
        self.ctx.proto_metrics.active.dec()

    def pause_writing(self) -> None:
        # The client is not reading its responses: stop reading from the broker, and from the
        # client too, or its denied requests would pile answers up here (a broker likewise mutes
        # a connection while a response is outstanding).
        if self.upstream is not None:
            self.upstream.pause_reading()
        self._hold("client_full")

    def resume_writing(self) -> None:
        if self.upstream is not None and not self._closed:
            self.upstream.resume_reading()
        self._release("client_full")

    def _hold(self, reason: str) -> None:
        """Stop reading from the client for `reason`; reading resumes when no reason is left."""
        if not self._holds and self.client is not None and not self._closed:
            self.client.pause_reading()
        self._holds.add(reason)

    def _release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds.discard(reason)
        if not self._holds and self.client is not None and not self._closed:
            self.client.resume_reading()

    # ---- upstream side ------------------------------------------------------------------

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        dest = self.ctx.destination
        try:
            transport, _ = await asyncio.wait_for(
                loop.create_connection(lambda: _Upstream(self), dest.host, dest.port),
                self.ctx.config.upstream_connect_timeout,
            )
        except asyncio.CancelledError:
            raise
        except (TimeoutError, OSError) as exc:
            if isinstance(exc, asyncio.TimeoutError):
                self.ctx.proto_metrics.upstream_timeout.inc()
            else:
                self.ctx.proto_metrics.upstream_refused.inc()
            self._close("upstream_unreachable", f"{dest.host}:{dest.port}: {exc}")
            return
        if self._closed:
            transport.close()
            return
        st = self.settings
        transport.set_write_buffer_limits(st.write_high_water, st.write_low_water)
        _set_buffer(transport, socket.SO_SNDBUF, st.socket_buffer)
        self.upstream = transport
        if self._queued:
            transport.writelines(self._queued)
            self._queued.clear()
            self._queued_bytes = 0
        self._release("connecting")

    def upstream_data(self, data: bytes) -> None:
        if self.layer.pass_response_bytes(len(data)):
            self.client.write(data)  # the middle of a large response (Fetch records)
            return
        try:
            commands = self.layer.upstream_data(data)
        except Exception as exc:
            self._close("internal_error", repr(exc))
            return
        self._run(commands)
        self._arm_idle()

    def upstream_lost(self, exc) -> None:
        if self._closed:
            return
        if exc is not None:
            self.ctx.proto_metrics.upstream_reset.inc()
        # Requests still in flight will never be answered: tell the client by closing.
        self._closed = True
        self._drop_side_work()
        self.client.close()

    def pause_client(self) -> None:
        self._hold("upstream_full")

    def resume_client(self) -> None:
        self._release("upstream_full")

    # ---- commands -----------------------------------------------------------------------

    def _run(self, commands: list) -> None:
        for cmd in commands:
            if self._closed:
                return
            kind = type(cmd)
            if kind is ToUpstream:
                if self._held_upstream is not None:
                    self._held_upstream.append(cmd.data)
                elif self.upstream is not None:
                    self.upstream.write(cmd.data)
                else:
                    self._queued.append(cmd.data)
                    self._queued_bytes += len(cmd.data)
                    if self._queued_bytes > self.settings.write_high_water:
                        self._hold("connecting")
            elif kind is ToClient:
                self.client.write(cmd.data)
            elif kind is Record:
                self._record(cmd)
            elif kind is ResolveTopicIds:
                self._hold("topic_ids")
                self._lookup_task = asyncio.ensure_future(self._look_up_topic_ids(cmd.ids))
            elif kind is Close:
                if self._held_upstream:
                    # Forwarded before the close: it goes out as it would have.
                    self._write_upstream(self._held_upstream)
                    self._held_upstream.clear()
                self._close(cmd.reason, cmd.detail)

    async def _look_up_topic_ids(self, ids: tuple) -> None:
        """Ask the broker for the topics' ids on a connection of our own; then the layer decides
        the waiting request again (an id still unknown is denied: fail closed)."""
        dest = self.ctx.destination
        try:
            learned = await shared_lookup(
                dest.host, dest.port, self.settings.max_frame_size,
                self.ctx.config.upstream_connect_timeout,
            )  # fmt: skip
            result = "found" if all(i in learned for i in ids) else "not_found"
        except asyncio.CancelledError:
            raise
        except Exception:  # unreachable, refused, timed out or a malformed answer
            learned, result = {}, "error"
        self.kmetrics.topic_id_lookups.labels(result=result).inc()
        self._lookup_task = None
        if self._closed:
            return
        self.layer.learn_topic_ids(learned)
        # Release first: a request behind this one may need a lookup of its own, and its
        # ResolveTopicIds must leave the client paused (reading resumes on a later loop turn
        # only, after the commands below have run).
        self._release("topic_ids")
        self._run(self.layer.topic_ids_resolved())
        self._arm_idle()
        if self._can_splice():
            self._start_splice()

    def _write_upstream(self, chunks: list) -> None:
        if chunks and self.upstream is not None and not self._closed:
            self.upstream.writelines(chunks)

    def _record(self, rec: Record) -> None:
        pm = self.ctx.proto_metrics
        if rec.kind == "RESPONSE":
            seconds = rec.latency_ns / 1e9
            pm.duration.observe(seconds)
            self.kmetrics.observe(rec.api_key, seconds)
            if rec.error_code:
                self.kmetrics.response_errors.labels(
                    api_key=api_name(rec.api_key), error_code=str(rec.error_code)
                ).inc()
        elif self._last_counted != rec.correlation_id or rec.verdict == "ERROR":
            # One count per request, though a request yields one record per topic.
            self._last_counted = rec.correlation_id
            pm.received.inc()
            if rec.verdict == "FORWARDED":
                pm.forwarded.inc()
            elif rec.verdict == "DROPPED":
                pm.denied.inc()
            else:
                pm.parse_errors.inc()
                if rec.closes:
                    self.kmetrics.frame_errors.labels(reason=rec.reason or "error").inc()
        if not self.ctx.flows.active:
            return
        name = api_name(rec.api_key) if rec.api_key >= 0 else "unknown"
        kafka = {
            "api_key": name,
            "api_version": rec.api_version,
            "correlation_id": rec.correlation_id,
            "topic": rec.topic or "",
            "error_code": rec.error_code,
        }
        l7 = {"type": rec.kind, "latency_ns": rec.latency_ns, "kafka": kafka}
        summary = f"Kafka {rec.kind.lower()} {name} v{rec.api_version}"
        if rec.topic:
            summary += f" topic {rec.topic}"
        if rec.reason and rec.verdict == "ERROR":
            summary += f" ({rec.reason})"
        drop = rec.reason if rec.verdict != "FORWARDED" else None
        self.ctx.flows.emit(self.ctx.flow(_VERDICTS[rec.verdict], l7, summary, drop_reason=drop))

    def _close(self, reason: str, detail: str) -> None:
        if self._closed:
            return
        if reason in ("internal_error", "upstream_unreachable", "splice_error"):
            # The layer records its own closes; these two come from here and need a flow too.
            self._record(Record("REQUEST", "ERROR", -1, -1, -1, reason=reason, closes=True))
        self._closed = True
        self._drop_side_work()
        if self.client is not None:
            self.client.close()
        if self.upstream is not None:
            self.upstream.close()

    def _drop_side_work(self) -> None:
        """On close: the splicer's fds and a topic id lookup in progress go."""
        if self._lookup_task is not None:
            self._lookup_task.cancel()
            self._lookup_task = None
        if self._splicer is not None:
            self._splicer.close()
            self._splicer = None


def make_session(ctx, first_bytes: bytes = b"") -> KafkaSession:
    return KafkaSession(ctx.for_proto("kafka") if hasattr(ctx, "for_proto") else ctx)
