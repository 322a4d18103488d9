"""HTTP/1 bodies through splice(2): once a head is judged, a large Content-Length body needs no
Python. The bytes move socket -> pipe -> socket in the kernel (l7proxy/splice.py), paced by the
sockets' readiness, while the transport of the side being read is paused.

Request bodies (client -> upstream): an allowed request with `Content-Length: N` where at least
`http1_splice_min_body` bytes are still to come after the read that held its head. What the
parser already took from that read went upstream first (through the transport, whose buffer
must be empty before the splice starts); the rest is spliced, exactly N minus that, and the
request parser is replaced by a fresh one, so the next pipelined request is parsed and judged
from its first byte like any other. The upstream sees the head the proxy rebuilt (with that one
Content-Length) and exactly N body bytes: the framing it reads is the one the proxy judged.

Response bodies (upstream -> client): a final response whose head came whole in one read, with
one Content-Length, no Transfer-Encoding, and at least `http1_splice_min_body` body bytes still
to come. The head and the bytes with it went through the transport (and the response parser);
once the client's write buffer is empty (looked at after each read) the rest is spliced, and
the response ends there (the parser is replaced for the next one).

Chunked bodies stay on the Python path both ways: request bodies are re-framed chunk by chunk
(the upstream never sees the client's framing), and following chunk sizes in a pipe would need
them read back into Python anyway. A denied request's body is never spliced (it is read and
dropped by the parser), and nothing is spliced before the head went upstream.

Deadlines: a request body in progress keeps the idle deadline, pushed on with every spliced
read (a client that stops mid-body is cut after `idle_timeout`, as on the Python path); a
response body has the same (no) deadline as on the Python path.
"""

from __future__ import annotations

import errno
import time

from l7proxy import splice
from l7proxy.http1.states import DRAINING, OPEN
from l7proxy.session import PauseReason
from parsers.http1 import EndOfMessage, RequestParser, ResponseEnd, ResponseParser

_monotonic = time.monotonic
AVAILABLE = splice.AVAILABLE
# What the pump reads of the request after a spliced one: a head (and the first body bytes).
HEAD_READ = 4 * 1024
_SPLICE_ONLY = int(PauseReason.SPLICE)


def request_content_length(headers) -> int:
    """The body length of a request head the strict parser accepted (it takes exactly one
    Content-Length of digits and never one with Transfer-Encoding); -1 when there is none."""
    for name, value in headers:
        if len(name) == 14 and name.lower() == b"content-length":
            return int(value) if value.isdigit() else -1
    return -1


def request_keeps_alive(version: bytes, headers) -> bool:
    """What llhttp makes of the head: HTTP/1.1 stays open unless Connection has `close`,
    HTTP/1.0 closes unless it has `keep-alive`."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if len(name) == 10 and name.lower() == b"connection":
            tokens.update(t.strip(b" \t").lower() for t in value.split(b","))
    if version == b"1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens and b"close" not in tokens


def response_content_length(head: bytes) -> int:
    """The body length of a final response head (without its blank line) that llhttp accepted,
    or -1 when the body may not be spliced: no Content-Length, more than one, any
    Transfer-Encoding, or a status without a body (1xx, 204, 304)."""
    code = head[9:12]
    if code[:1] == b"1" or code == b"204" or code == b"304":
        return -1
    length = -1
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        size = len(name)
        if size == 17 and name.lower() == b"transfer-encoding":
            return -1
        if size == 14 and name.lower() == b"content-length":
            value = value.strip(b" \t")
            if length >= 0 or not value.isdigit():
                return -1
            length = int(value)
    return length


def _fd(transport) -> int:
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


class _BodyPump:
    """One body on its way through a pipe: a `SpliceOwner` (l7proxy/splice.py). When the body
    is through, a pump whose connection goes on reads the start of the next message from its
    source itself (HEAD_READ bytes, when it comes) rather than handing back to the source's
    transport, whose 256 KiB read would carry the first quarter of the next large body through
    Python (as Kafka's Produce does, docs/kafka.md); then reading goes back to the transport
    (`_hand_back`). The subclasses say what the source is (`_source_open`, `_resume_source`,
    `_receive`) and what ends a body (`_through`)."""

    __slots__ = ("session", "up", "left", "splicer", "broken", "moved", "waiting_head", "idle")

    def __init__(self, session, up, left: int, source, sink) -> None:
        self.session = session
        self.up = up
        self.left = left
        self.broken = False
        self.moved = 0
        self.waiting_head = False  # for the next message's start, the source's transport paused
        self.idle = False  # while the source's side takes what was read of the next message
        self.splicer = splice.Splicer(self, _fd(source), _fd(sink))

    def splice_bytes_left(self) -> int:
        return self.left

    def spliced(self, n: int) -> None:
        self.left -= n
        self.moved += n

    def splice_ready(self) -> None:
        if self.waiting_head:
            self._next_head()
        elif self.splicer.pump() and not self.broken and not self.splicer.closed:
            self._through()

    def close(self) -> None:
        """The pipe and dup()s go; a pump waiting for the next head gives reading back."""
        waiting = self.waiting_head
        self.waiting_head = self.idle = False
        self.splicer.close()
        session = self.session
        if session.pumps is not None:
            session.pumps.discard(self)
        if waiting:
            self._resume_source()

    def _wait_for_head(self) -> None:
        self.waiting_head = True  # (the source's transport stays paused)
        self.splicer.wait_for_source()

    def _next_head(self) -> None:
        try:
            data = self.splicer.read_head(HEAD_READ)
        except OSError:
            data = b""  # the transport's read meets the end or the error
        if data is None:
            self.splicer.wait_for_source()
            return
        self._hand_back(data)

    def _hand_back(self, data: bytes = b"") -> None:
        """Reading goes back to the source's transport, after the source's side took `data`
        (the start of the next message, read here). While it takes it the pump stays,
        unwatched (`idle`): when that message's body is spliced too, its pump is this one
        (`again`), and the pipe is not made again (`SplicedBodies._idle_pump`)."""
        self.waiting_head = False
        if not data or not self._source_open():
            self.close()
            self._resume_source()
            return
        self.splicer.unwatch()
        self.idle = True
        self._resume_source()
        try:
            self._receive(data)
        finally:
            if self.idle:  # not taken by the next body
                self.close()

    def _source_open(self) -> bool:
        raise NotImplementedError

    def _resume_source(self) -> None:
        raise NotImplementedError

    def _receive(self, data: bytes) -> None:
        raise NotImplementedError

    def _through(self) -> None:
        raise NotImplementedError


class RequestBodyPump(_BodyPump):
    """client -> upstream, the rest of an allowed Content-Length request body; then the next
    request's head (`_BodyPump`)."""

    __slots__ = ("keep_alive",)

    def __init__(self, session, up, left: int, keep_alive: bool) -> None:
        super().__init__(session, up, left, session.transport, up.transport)
        self.keep_alive = keep_alive

    def spliced(self, n: int) -> None:
        self.left -= n
        self.moved += n
        session = self.session
        session.deadline = _monotonic() + session.cfg.idle_timeout  # the upload progresses

    def splice_failed(self, exc: OSError) -> None:
        """EPIPE is the upstream's side (a pooled connection it had closed, say): the client
        gets the 503 it gets on the Python path; anything else closes both."""
        self.broken = True
        self.close()
        session = self.session
        if exc.errno == errno.EPIPE and self.up is session.upstream and not self.up.got_bytes:
            session.on_upstream_lost(self.up, "reset")
        session._close()

    def source_eof_in_message(self) -> None:
        """The client closed in the middle of the body: the upstream gets a cut request, on a
        connection that closes with the client's."""
        self.broken = True
        self.close()
        self.session._close()

    def _through(self) -> None:
        session = self.session
        cfg = session.cfg
        # The old parser still waits for the bytes that went past it.
        session.parser = RequestParser(
            cfg.max_header_bytes, cfg.max_header_count, cfg.max_uri_bytes
        )
        session._on_end(EndOfMessage((), self.keep_alive))
        if session.closed or session.paused != _SPLICE_ONLY or session.state is not OPEN:
            self._hand_back()  # not another request now (closing, draining, paused)
            return
        # The next head is read when it comes (not now: a client that pipelines would nest
        # one call per request; and wrk-like clients send it only after the answer). The
        # upstream's dup() goes meanwhile: the connection may close or go back to the pool.
        self.splicer.drop_sink()
        self.up = None
        self._wait_for_head()

    def _source_open(self) -> bool:
        return not self.session.closed

    def _resume_source(self) -> None:
        self.session.resume_client_reading(PauseReason.SPLICE)

    def _receive(self, data: bytes) -> None:
        self.session.data_received(data)

    def again(self, up, left: int, keep_alive: bool) -> None:
        """This idle pump (its pipe and the client's dup()) for the next body, to `up`.
        Raises OSError (out of fds: the Python path carries that body)."""
        self.splicer.set_sink(_fd(up.transport))
        self.idle = False
        self.up = up
        self.left = left
        self.keep_alive = keep_alive


class ResponseBodyPump(_BodyPump):
    """upstream -> client, the rest of a Content-Length response body; then the next
    response's head (`_BodyPump`). While it waits for that, the upstream's transport stays
    paused; whatever ends the wait (the head, the upstream's end, the session closing or
    parking its upstream) gives reading back to the transport."""

    __slots__ = ("status", "keep_alive")

    def __init__(self, session, up, left: int) -> None:
        super().__init__(session, up, left, up.transport, session.transport)
        self._of_response()

    def _of_response(self) -> None:
        parser = self.up.parser
        self.status = parser.status
        self.keep_alive = not parser.ends_at_close

    def again(self, left: int) -> None:
        """This idle pump (its pipe and both dup()s) for the next body of the same upstream."""
        self.idle = False
        self.left = left
        self._of_response()

    def source_eof_in_message(self) -> None:
        """The upstream closed in the middle of the body: the client's connection ends too."""
        self.broken = True
        self.close()
        session = self.session
        session.on_upstream_lost(self.up, "closed")  # counted as a reset, the client closes
        session._close()

    def splice_failed(self, exc: OSError) -> None:
        self.broken = True
        self.close()
        session = self.session
        if self.up is session.upstream and not self.up.closed:
            session.on_upstream_lost(self.up, "reset")  # counted, and the client closes
        session._close()

    def _through(self) -> None:
        up = self.up
        session = self.session
        up.parser = ResponseParser()  # the old one still waits for the spliced bytes
        session.on_response_end(ResponseEnd(self.status, self.keep_alive))
        if (
            self.splicer.closed
            or session.closed
            or up.closed
            or session.upstream is not up
            or not self.keep_alive
        ):
            self._hand_back()
            return
        self._wait_for_head()

    def _source_open(self) -> bool:
        return not self.up.closed and not self.session.closed

    def _resume_source(self) -> None:
        if not self.up.closed:
            self.up.transport.resume_reading()

    def _receive(self, data: bytes) -> None:
        self.up.data_received(data)


class SplicedBodies:
    """The session's side of it: when to start a pump, and closing them with the session. A
    mixin of `Http1Session`; `pumps` is None until the first pump (most sessions have none)."""

    __slots__ = ()

    def _splice_request_body(self) -> None:
        """After a read: splice the rest of the body being read, if it is large enough and
        nothing is in the way (bytes still buffered for the upstream, another request first)."""
        ex = self.parsing
        if (
            ex is None
            or ex.body_left < self.cfg.http1_splice_min_body
            or not ex.sent
            or ex.complete
            or self.closed
            or self.state > DRAINING  # (upgrading or a tunnel: see states.py)
            or not self.queue
            or self.queue[0] is not ex
            or not AVAILABLE
        ):
            return
        up = self.upstream
        if up is None or up.closed or up.transport.get_write_buffer_size():
            return
        keep_alive = request_keeps_alive(ex.req.version, ex.req.headers)
        pump = self._idle_pump(RequestBodyPump)
        try:
            if pump is not None:
                pump.again(up, ex.body_left, keep_alive)
            else:
                pump = RequestBodyPump(self, up, ex.body_left, keep_alive)
        except OSError:
            return  # out of fds or pipes: the Python path carries this body
        ex.body_left = 0
        self._add_pump(pump)
        self.pause_client_reading(PauseReason.SPLICE)
        pump.splice_ready()

    def splice_response_body(self, up, data: bytes, head_end: int) -> None:
        """Called by the upstream connection after a read that did not end the response and
        either held a whole response head (ending at `head_end`) or came while `up.body_left`
        counts a body that waits for the client's write buffer to empty."""
        if head_end >= 0:
            length = response_content_length(data[:head_end])
            left = length - (len(data) - head_end - 4)
        else:
            length, left = 0, up.body_left - len(data)
        up.body_left = 0
        if (
            length < 0
            or left < self.cfg.http1_splice_min_body
            or not self.cfg.http1_splice_min_body
            or not AVAILABLE
            or up is not self.upstream
            or self.closed
            or self.state > DRAINING
            or up.parser.error is not None
        ):
            return
        if self.transport.get_write_buffer_size():
            up.body_left = left  # bytes before it still wait: look again after the next read
            return
        pump = self._idle_pump(ResponseBodyPump)
        if pump is not None:
            pump.again(left)
        else:
            try:
                pump = ResponseBodyPump(self, up, left)
            except OSError:
                return
        self._add_pump(pump)
        up.transport.pause_reading()
        pump.splice_ready()

    def _idle_pump(self, cls: type[_BodyPump]) -> _BodyPump | None:
        """The pump of this direction whose read brought the message being taken (a pump is
        idle only while its `_hand_back` runs, so it reads from this message's source)."""
        for pump in self.pumps or ():
            if pump.__class__ is cls and pump.idle:
                return pump
        return None

    def _stop_response_wait(self) -> None:
        """A response pump waiting for the next head lets go (the upstream goes back to the
        pool): the transport reads again."""
        for pump in list(self.pumps or ()):
            if pump.__class__ is ResponseBodyPump and pump.waiting_head:
                pump.close()

    def _add_pump(self, pump: _BodyPump) -> None:
        if self.pumps is None:
            self.pumps = set()
        self.pumps.add(pump)

    def _pumping_response(self) -> bool:
        return bool(self.pumps) and any(p.__class__ is ResponseBodyPump for p in self.pumps)

    def _close_pumps(self) -> None:
        pumps = self.pumps
        if pumps:
            for pump in list(pumps):
                pump.broken = True
                pump.close()
