"""The Kafka protocol session: one client connection, one upstream connection, a KafkaLayer
in between. This module only moves bytes and carries out the layer's commands; the splice(2)
pump for large Produce bodies is in l7proxy/splice.py, what a worker's sessions share in worker.py.

It keeps the session contract of l7proxy/session.py: client reading pauses for PauseReason bits
(the broker's buffer is full, the client's is, the broker is still being connected, too many
requests wait, a body is being spliced, a topic id lookup runs), one deadline (the idle timeout,
while no request is in flight), drain and close.
"""

from __future__ import annotations

import asyncio
import socket
import time

from l7proxy import splice
from l7proxy.kafka.commands import (
    Close,
    KafkaSettings,
    Record,
    ResolveTopicIds,
    ToClient,
    ToUpstream,
)
from l7proxy.kafka.flow_records import FlowRecorder
from l7proxy.kafka.layer import KafkaLayer
from l7proxy.kafka.settings import settings_for
from l7proxy.kafka.worker import KafkaWorker, worker_for
from l7proxy.session import NO_DEADLINE, PauseReason, Session

# Requests in flight on one connection before the proxy stops reading the client.
MAX_IN_FLIGHT = 1024
# The rest of a cut-through request at least this large moves client -> broker with splice(2)
# through a pipe, in the kernel: no copy into Python objects and back (see docs/kafka.md).
SPLICE_MIN = 64 * 1024
# After a spliced request: the next request's head, enough for the topics of a usual Produce
# (a head whose topics do not fit goes back to the transport). 16 KiB copied 14 KiB more of each
# body through Python: proxy CPU 0.51-0.53 -> 0.46-0.48 us per message (docs/kafka.md).
HEAD_READ = 2 * 1024


class _Upstream(asyncio.Protocol):
    def __init__(self, session: KafkaSession) -> None:
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.upstream_data(data)

    def connection_lost(self, exc) -> None:
        self.session.upstream_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_client_reading(PauseReason.UPSTREAM_FULL)

    def resume_writing(self) -> None:
        self.session.resume_client_reading(PauseReason.UPSTREAM_FULL)


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


_IDLE = 1  # deadline_kind: no request in flight, the idle timeout runs
_SPLICE_ONLY = PauseReason.SPLICE._value_


class KafkaSession(Session):
    def __init__(
        self, ctx, settings: KafkaSettings | None = None, worker: KafkaWorker | None = None
    ) -> None:
        super().__init__()
        self.ctx = ctx
        self.limits = ctx.config.kafka
        self.settings = settings or settings_for(ctx)
        worker = worker or worker_for(ctx)
        self.worker = worker
        self.layer = KafkaLayer(ctx.rules, self.settings, time.monotonic_ns, worker.topic_ids)
        self.responses = self.layer.responses
        self.kmetrics = worker.metrics
        self.recorder = FlowRecorder(ctx, worker.metrics)
        self.upstream = None
        self._queued: list[bytes] = []  # for upstream, until it is connected
        self._queued_bytes = 0
        self._connect_task = None
        self._draining = False
        # The core's DeadlineSweeper (gateway/agent) tracks sessions for idle timeouts and drain.
        self.sweeper = getattr(ctx, "sweeper", None)
        self._splicer: splice.Splicer | None = None
        self._splice_ok = splice.AVAILABLE
        self._held_upstream: list | None = None  # see splice_ready
        self.spliced_bytes = 0  # request bytes moved with splice(2) (tests, diagnostics)
        self._lookup_task = None  # see ResolveTopicIds

    # ---- client side --------------------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        limits = self.limits
        transport.set_write_buffer_limits(limits.write_high_water, limits.write_low_water)
        _set_buffer(transport, socket.SO_RCVBUF, limits.socket_buffer)
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
            self.pause_client_reading(PauseReason.REQUEST_QUEUE)
        elif in_flight <= MAX_IN_FLIGHT // 2 and self.paused:
            self.resume_client_reading(PauseReason.REQUEST_QUEUE)
        if in_flight:
            self.deadline_kind = NO_DEADLINE
        else:
            self.deadline_kind = _IDLE
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
            and not self.closed
            and not self.upstream.get_write_buffer_size()  # bytes queued before must go first
        )

    def _start_splice(self) -> None:
        if self._splicer is None:
            cfd, ufd = _fd(self.transport), _fd(self.upstream)
            if cfd < 0 or ufd < 0:
                self._splice_ok = False
                return
            try:
                self._splicer = splice.Splicer(self, cfd, ufd)
            except OSError:
                self._splice_ok = False
                return
        self.pause_client_reading(PauseReason.SPLICE)
        self.splice_ready()

    def splice_ready(self) -> None:
        """Pump the spliced request; when it is through, read the next request's head here
        (HEAD_READ bytes), waiting for it if the client has not sent it yet, so that the
        transport's large read does not copy the next body into Python, and splice that body
        too. Reading goes back to the transport for anything else (a small request, EOF, an
        error, another reason to pause the client)."""
        splicer = self._splicer
        while not self.closed and splicer is not None:
            if not splicer.pump():
                return  # waiting for the client to send or the broker to read
            if self.closed or self.paused != _SPLICE_ONLY:
                break
            try:
                data = splicer.read_head(HEAD_READ)
            except OSError:
                break  # an error the transport will see
            if data is None:
                # Handing back to the transport here sent the first 256 KiB of nearly every
                # next request through Python (21 % of the bytes): wait for the head instead.
                splicer.wait_for_source()
                return
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
        self.resume_client_reading(PauseReason.SPLICE)

    # SpliceOwner (l7proxy/splice.py)

    def splice_bytes_left(self) -> int:
        return self.layer.request_bytes_left

    def spliced(self, n: int) -> None:
        self.layer.pass_request_bytes(n)
        self.spliced_bytes += n

    def source_eof_in_message(self) -> None:
        self._close("client_eof", "client closed in the middle of a request")

    def splice_failed(self, exc: OSError) -> None:
        self._close("splice_error", repr(exc))

    def eof_received(self):
        if self.upstream is not None and not self.closed:
            self.upstream.write_eof()
        return True

    def connection_lost(self, exc) -> None:
        if self.sweeper is not None:
            self.sweeper.discard(self)
        self._drop_side_work()
        if not self.closed:
            self.closed = True
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
        self.pause_client_reading(PauseReason.CLIENT_FULL)

    def resume_writing(self) -> None:
        if self.upstream is not None and not self.closed:
            self.upstream.resume_reading()
        self.resume_client_reading(PauseReason.CLIENT_FULL)

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
        if self.closed:
            transport.close()
            return
        limits = self.limits
        transport.set_write_buffer_limits(limits.write_high_water, limits.write_low_water)
        _set_buffer(transport, socket.SO_SNDBUF, limits.socket_buffer)
        self.upstream = transport
        if self._queued:
            transport.writelines(self._queued)
            self._queued.clear()
            self._queued_bytes = 0
        self.resume_client_reading(PauseReason.CONNECTING)

    def upstream_data(self, data: bytes) -> None:
        if self.responses.pass_response_bytes(len(data)):
            self.transport.write(data)  # the middle of a large response (Fetch records)
            return
        try:
            commands = self.responses.upstream_data(data)
        except Exception as exc:
            self._close("internal_error", repr(exc))
            return
        self._run(commands)
        self._arm_idle()

    def upstream_lost(self, exc) -> None:
        if self.closed:
            return
        if exc is not None:
            self.ctx.proto_metrics.upstream_reset.inc()
        # Requests still in flight will never be answered: tell the client by closing.
        self.closed = True
        self._drop_side_work()
        self.transport.close()

    # ---- commands -----------------------------------------------------------------------

    def _run(self, commands: list) -> None:
        for cmd in commands:
            if self.closed:
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
                    if self._queued_bytes > self.limits.write_high_water:
                        self.pause_client_reading(PauseReason.CONNECTING)
            elif kind is ToClient:
                self.transport.write(cmd.data)
            elif kind is Record:
                self.recorder.record(cmd)
            elif kind is ResolveTopicIds:
                self.pause_client_reading(PauseReason.TOPIC_IDS)
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
            learned = await self.worker.lookups.lookup(
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
        if self.closed:
            return
        self.layer.learn_topic_ids(learned)
        # Release first: a request behind this one may need a lookup of its own, and its
        # ResolveTopicIds must leave the client paused (reading resumes on a later loop turn
        # only, after the commands below have run).
        self.resume_client_reading(PauseReason.TOPIC_IDS)
        self._run(self.layer.topic_ids_resolved())
        self._arm_idle()
        if self._can_splice():
            self._start_splice()

    def _write_upstream(self, chunks: list) -> None:
        if chunks and self.upstream is not None and not self.closed:
            self.upstream.writelines(chunks)

    def _close(self, reason: str, detail: str) -> None:
        if self.closed:
            return
        if reason in ("internal_error", "upstream_unreachable", "splice_error"):
            # The layer records its own closes; these two come from here and need a flow too.
            self.recorder.record(Record("REQUEST", "ERROR", -1, -1, -1, reason=reason, closes=True))
        self.closed = True
        self._drop_side_work()
        if self.transport is not None:
            self.transport.close()
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
