"""A sans-IO HTTP/2 frame relay that enforces a per-stream policy (RFC 9113).

The relay sits between one client connection and one server connection. It does not terminate
HTTP/2 on either side: it parses the 9-byte frame headers and passes frames through, and only
decodes what the policy needs (request header blocks) plus the server's header blocks for the
response status (memoized, see headers.py). Data flows through untouched, so flow control is end to
end: the receiver's own WINDOW_UPDATEs acknowledge data that was actually written onward.

Interface (h2-style): `receive_client(bytes)` / `receive_server(bytes)` return events, then
`data_to_client()` / `data_to_server()` give the bytes to write. After `closed` becomes true the
session flushes both and closes the connections.

What the relay itself answers, and why:
- Denied streams are answered locally (403 or a gRPC trailers-only PERMISSION_DENIED) and never
  reach the server. Their request DATA still consumed the client's connection window, so the relay
  returns it with its own WINDOW_UPDATEs. Bytes of a local 403 body consumed the client's receive
  window without the server knowing; the relay withholds that much from the client's next
  connection WINDOW_UPDATE to the server (`_debt`), and holds server DATA back if it would overrun
  the client's real window meanwhile.
- PING is answered per hop. PRIORITY is dropped (deprecated by RFC 9113). Server push is disabled
  (ENABLE_PUSH=0 towards the server).
- SETTINGS pass through both ways, with MAX_CONCURRENT_STREAMS, MAX_FRAME_SIZE and
  HEADER_TABLE_SIZE capped to the relay's limits; the peer's ACK is relayed back.
"""

from __future__ import annotations

from collections.abc import Callable

from parsers.http2 import frames as f
from parsers.http2.events import (
    ConnectionFailed,
    Decision,
    GoawayReceived,
    H2Limits,
    PrefaceReceived,
    RequestReceived,
    RequestRejected,
    StreamEnded,
)
from parsers.http2.grpc import denied_trailers_only
from parsers.http2.headers import (
    CachingDecoder,
    HeaderBlockError,
    MalformedRequest,
    Request,
    check_trailers,
    encode_fields,
    header_list_size,
    parse_request,
)

_ALLOW, _DENY, _TOO_LARGE, _MALFORMED = range(4)
_NO_EVENTS: list = []


class _Stream:
    """One client-initiated stream the relay still tracks."""

    __slots__ = ("forwarded", "client_open", "server_open", "status", "body", "window", "discarded")

    def __init__(self, forwarded: bool, client_open: bool) -> None:
        self.forwarded = forwarded
        self.client_open = client_open  # the client may still send on it
        self.server_open = forwarded  # the server (or the proxy's local answer) is not done
        self.status = 0  # final response status once the server's response head came
        self.body = b""  # a local response body waiting for flow-control window
        self.window = 0
        self.discarded = 0  # request body bytes of a denied stream dropped so far


class _Entry:
    """The memoized evaluation of one request header block."""

    __slots__ = ("kind", "request", "decision", "block", "reason")

    def __init__(self, kind, request=None, decision=None, block=b"", reason="") -> None:
        self.kind = kind
        self.request = request
        self.decision = decision
        self.block = block
        self.reason = reason


class H2Relay:
    def __init__(
        self,
        decide: Callable[[Request], Decision],
        policy_epoch: Callable[[], object] = lambda: None,
        limits: H2Limits = H2Limits(),
    ) -> None:
        self.limits = limits
        self._decide = decide
        self._policy_epoch = policy_epoch
        self._epoch: object = object()
        self._entries: dict[bytes, _Entry] = {}
        self._entries_generation = 0
        self._response_summaries: dict[bytes, tuple] = {}
        self._requests = CachingDecoder(limits.hard_header_list_size)
        self._responses = CachingDecoder(max(limits.hard_header_list_size, 1 << 20))
        self._responses.allow_table_size(max(limits.response_header_table_size, 4096))
        self._deny_http_block = encode_fields(
            (
                (":status", "403"),
                ("content-type", "text/plain"),
                ("content-length", str(len(limits.deny_body))),
            )
        )
        self._deny_grpc_block = encode_fields(denied_trailers_only(limits.grpc_deny_message))
        self._too_large_block = encode_fields(((":status", "431"), ("content-length", "0")))

        self._cbuf = b""
        self._sbuf = b""
        self._to_client: list[bytes] = []
        self._to_server: list[bytes] = []
        self._events: list = []
        self._streams: dict[int, _Stream] = {}
        self._max_client_sid = 0
        self._preface_left = f.PREFACE
        self._upgraded = False
        self._client_settings_seen = False
        self._server_settings_seen = False
        self._swallow_server_acks = 0
        # Header block being assembled from HEADERS + CONTINUATION, per side.
        self._cblock: list[bytes] | None = None
        self._cblock_sid = 0
        self._cblock_end_stream = False
        self._cblock_size = 0
        self._cblock_frames = 0
        self._sblock: list[bytes] | None = None  # raw frames, forwarded once complete
        self._sblock_parts: list[bytes] = []
        self._sblock_sid = 0
        self._sblock_end_stream = False
        self._sblock_size = 0
        # Peer settings the relay needs for what it sends itself.
        self._server_max_frame = f.DEFAULT_MAX_FRAME_SIZE
        self._client_max_frame = f.DEFAULT_MAX_FRAME_SIZE
        self._client_initial_window = f.DEFAULT_WINDOW
        self._server_concurrency_sent = False
        # Connection-level flow control towards the client (see module docstring).
        self._client_conn_window = f.DEFAULT_WINDOW
        self._debt = 0
        self._held: list[tuple[int, bytes]] = []
        self._held_bytes = 0
        self._waiting_bodies: set[int] = set()
        self._credit = 0  # connection window returned to the client for dropped DATA
        # Flood budgets.
        self._reset_budget = limits.reset_burst
        self._control_budget = limits.control_burst
        self._server_goaway_last: int | None = None
        self.draining = False
        self.closed = False

    # ----------------------------------------------------------------- outputs

    def data_to_client(self) -> bytes:
        if not self._server_settings_seen and not self.closed:
            # The server's SETTINGS must be the first frame the client sees (the server
            # connection preface): the proxy's own answers wait behind it.
            return b""
        if self._credit:
            self._to_client.append(f.window_update(0, self._credit))
            self._credit = 0
        if not self._to_client:
            return b""
        out = self._to_client[0] if len(self._to_client) == 1 else b"".join(self._to_client)
        self._to_client = []
        return out

    def data_to_server(self) -> bytes:
        if not self._to_server:
            return b""
        out = self._to_server[0] if len(self._to_server) == 1 else b"".join(self._to_server)
        self._to_server = []
        return out

    @property
    def active_streams(self) -> int:
        return len(self._streams)

    @property
    def awaiting_preface(self) -> bool:
        return bool(self._preface_left)

    def _take_events(self) -> list:
        if not self._events:
            return _NO_EVENTS
        events = self._events
        self._events = []
        return events

    # ----------------------------------------------------------------- control

    def tick(self) -> None:
        """Refill the flood budgets (the session calls this once per second)."""
        lim = self.limits
        self._reset_budget = min(lim.reset_burst, self._reset_budget + lim.reset_refill)
        self._control_budget = min(lim.control_burst, self._control_budget + lim.control_refill)

    def drain(self) -> None:
        """Graceful shutdown: GOAWAY to the client; streams in flight finish, new ones are refused."""
        if self.closed or self.draining:
            return
        self.draining = True
        if not self._server_settings_seen:
            self._to_client.insert(0, f.settings_frame())  # the server preface comes first
            self._server_settings_seen = True
        self._to_client.append(f.goaway(self._last_stream_id(), f.NO_ERROR))
        if not self._streams:
            self.closed = True

    def server_closed(self) -> list:
        """The upstream connection ended (EOF or error)."""
        if self.closed:
            return self._take_events()
        last = self._server_goaway_last
        if last is not None:
            # The server announced it: streams above its last ID were never processed, and the
            # client, which saw that GOAWAY, may retry them.
            for sid in [s for s in self._streams if s > last and self._streams[s].forwarded]:
                stream = self._streams.pop(sid)
                self._events.append(
                    StreamEnded(sid, stream.status, reset_code=f.REFUSED_STREAM, reset_by="server")
                )
        if any(stream.forwarded for stream in self._streams.values()) or self._preface_left:
            self._fail("server", f.INTERNAL_ERROR, "upstream connection closed")
        else:
            if last is None:
                self._to_client.append(f.goaway(self._max_client_sid, f.NO_ERROR))
            self.closed = True
        return self._take_events()

    def _last_stream_id(self) -> int:
        """For a GOAWAY to the client: never higher than one already relayed (RFC 9113 6.8)."""
        last = self._max_client_sid
        if self._server_goaway_last is not None:
            last = min(last, self._server_goaway_last)
        return last

    def upstream_failed(self, reason: str) -> list:
        """The upstream connection could not be opened: refuse everything."""
        if not self.closed:
            # Last stream 0: nothing was processed, the client may retry every request.
            self._fail("server", f.INTERNAL_ERROR, reason, last_stream_id=0)
        return self._take_events()

    def _fail(self, side: str, code: int, reason: str, last_stream_id: int = -1) -> None:
        """A connection error caused by `side`: GOAWAY both ways, then the session closes. The
        innocent side hears INTERNAL_ERROR (its streams in flight are lost, not its fault)."""
        if self.closed:
            return
        self.closed = True
        debug = reason.encode("ascii", "replace")[:128]
        client_code = code if side == "client" else f.INTERNAL_ERROR
        last = self._last_stream_id() if last_stream_id < 0 else last_stream_id
        if not self._server_settings_seen:
            self._to_client.insert(0, f.settings_frame())
        self._to_client.append(f.goaway(last, client_code, debug))
        self._to_server.append(f.goaway(0, code if side == "server" else f.NO_ERROR, debug))
        self._events.append(ConnectionFailed(side, code, reason))

    def _spend_control(self) -> bool:
        self._control_budget -= 1
        if self._control_budget < 0:
            self._fail("client", f.ENHANCE_YOUR_CALM, "control frame flood")
            return False
        return True

    def _spend_reset(self) -> bool:
        self._reset_budget -= 1
        if self._reset_budget < 0:
            self._fail("client", f.ENHANCE_YOUR_CALM, "stream reset flood")
            return False
        return True

    # ----------------------------------------------------------------- h2c upgrade

    def start_upgraded(
        self, headers: tuple[tuple[str, str], ...], body: bytes, settings_payload: bytes
    ) -> list:
        """The HTTP/1.1 request that carried `Upgrade: h2c` becomes stream 1, half-closed on the
        client side (RFC 7540 section 3.2). Its HTTP2-Settings act as the client's first SETTINGS
        towards the server (the 101 acknowledged them, so the server's ACK is swallowed)."""
        self._upgraded = True
        self._to_server.append(f.PREFACE)
        self._to_server.append(self._client_settings(settings_payload))
        self._swallow_server_acks += 1
        self._max_client_sid = 1
        entry = self._evaluate(headers)
        forwarded_body = bool(body) and entry.kind == _ALLOW
        self._open_stream(1, entry, end_stream=not forwarded_body)
        stream = self._streams.get(1)
        if forwarded_body and stream is not None:
            step = self._server_max_frame
            for i in range(0, len(body), step):
                self._to_server.append(f.data_frame(1, body[i : i + step], i + step >= len(body)))
            stream.client_open = False
        return self._take_events()

    # ----------------------------------------------------------------- client -> server

    def receive_client(self, data: bytes) -> list:
        if self.closed:
            return _NO_EVENTS
        if self._preface_left:
            data = self._receive_preface(data)
            if not data:
                return self._take_events()
        epoch = self._policy_epoch()  # once per read: a reload applies from the next read on
        if epoch is not self._epoch:
            self._epoch = epoch
            self._entries.clear()
        buf = self._cbuf + data if self._cbuf else data
        end = len(buf)
        pos = 0
        run = -1  # start of a run of DATA frames forwarded unchanged
        out = self._to_server
        max_frame = self.limits.max_frame_size
        streams = self._streams
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > max_frame:
                self._fail("client", f.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                break
            fend = pos + 9 + length
            if fend > end:
                break
            ftype = buf[pos + 3]
            flags = buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if ftype == 0 and self._cblock is None:
                stream = streams.get(sid)
                if stream is not None and stream.forwarded and stream.client_open:
                    if not length and not flags & 1 and not self._spend_control():
                        break
                    if flags & 1:
                        stream.client_open = False
                        if not stream.server_open:
                            del streams[sid]
                    if run < 0:
                        run = pos
                    pos = fend
                    continue
            if run >= 0:
                out.append(buf[run:pos])
                run = -1
            if (
                ftype == 1
                and flags & 0x2C == 4  # END_HEADERS, no padding, no priority
                and sid > self._max_client_sid
                and sid & 1
                and self._cblock is None
                and self._client_settings_seen
            ):
                # The common case, a new request in one HEADERS frame.
                self._max_client_sid = sid
                self._new_request(sid, flags & 1, buf[pos + 9 : fend])
                if self.closed:
                    break
                pos = fend
                continue
            self._client_frame(ftype, flags, sid, buf[pos + 9 : fend], buf, pos, fend)
            if self.closed:
                break
            pos = fend
        if run >= 0 and not self.closed:
            out.append(buf[run:pos])
        self._cbuf = buf[pos:] if pos < end and not self.closed else b""
        if self.draining and not self._streams:
            self.closed = True  # graceful: the last stream finished after GOAWAY
        return self._take_events()

    def _receive_preface(self, data: bytes) -> bytes:
        want = self._preface_left
        chunk = data[: len(want)]
        if not want.startswith(chunk):
            self._fail("client", f.PROTOCOL_ERROR, "invalid connection preface")
            return b""
        self._preface_left = want[len(chunk) :]
        if not self._preface_left:
            if not self._upgraded:
                self._to_server.append(f.PREFACE)
            self._events.append(PrefaceReceived())
        return data[len(chunk) :]

    def _client_frame(self, ftype, flags, sid, payload, buf, pos, fend) -> None:
        if self._cblock is not None and ftype != f.CONTINUATION:
            return self._fail("client", f.PROTOCOL_ERROR, "frame inside a header block")
        if not self._client_settings_seen and (ftype != f.SETTINGS or flags & f.FLAG_ACK):
            return self._fail("client", f.PROTOCOL_ERROR, "first frame is not SETTINGS")
        if ftype == f.HEADERS:
            return self._client_headers(flags, sid, payload)
        if ftype == f.DATA:
            return self._client_data_dropped(flags, sid, len(payload))
        if ftype == f.CONTINUATION:
            return self._client_continuation(flags, sid, payload)
        if ftype == f.WINDOW_UPDATE:
            return self._client_window_update(sid, payload, buf, pos, fend)
        if ftype == f.RST_STREAM:
            return self._client_rst(sid, payload, buf, pos, fend)
        if ftype == f.SETTINGS:
            return self._client_settings_frame(flags, sid, payload, buf, pos, fend)
        if ftype == f.PING:
            if len(payload) != 8:
                return self._fail("client", f.FRAME_SIZE_ERROR, "PING length")
            if sid:
                return self._fail("client", f.PROTOCOL_ERROR, "PING on a stream")
            if not flags & f.FLAG_ACK and self._spend_control():
                self._to_client.append(f.ping_ack(payload))
            return None
        if ftype == f.PRIORITY:
            if not sid:
                return self._fail("client", f.PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._to_client.append(f.rst_stream(sid, f.FRAME_SIZE_ERROR))
                return None
            self._spend_control()
            return None
        if ftype == f.GOAWAY:
            if sid or len(payload) < 8:
                return self._fail("client", f.PROTOCOL_ERROR, "malformed GOAWAY")
            self._to_server.append(buf[pos:fend])
            self._events.append(
                GoawayReceived(
                    "client",
                    int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                    int.from_bytes(payload[4:8], "big"),
                )
            )
            return None
        if ftype == f.PUSH_PROMISE:
            return self._fail("client", f.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        self._spend_control()  # unknown frame types are ignored (RFC 9113 section 4.1)
        return None

    def _client_data_dropped(self, flags: int, sid: int, length: int) -> None:
        """DATA the server must not see: a denied or closed stream, or a protocol error. The
        bytes still count against the client's windows, so the relay returns them itself."""
        if not sid:
            return self._fail("client", f.PROTOCOL_ERROR, "DATA on stream 0")
        if sid > self._max_client_sid:
            return self._fail("client", f.PROTOCOL_ERROR, "DATA on an idle stream")
        if not length and not flags & f.FLAG_END_STREAM and not self._spend_control():
            return None
        self._credit += length
        stream = self._streams.get(sid)
        if stream is None:
            return None  # a stream already closed or reset: in-flight data is dropped
        if not stream.client_open:
            return self._reset_both(sid, stream, f.STREAM_CLOSED)
        if flags & f.FLAG_END_STREAM:
            stream.client_open = False
            if not stream.body:
                del self._streams[sid]
            return None
        # The body of a denied request is read and dropped (like HTTP/1), up to a limit.
        stream.discarded += length
        if stream.discarded > self.limits.max_discarded_body:
            self._to_client.append(f.rst_stream(sid, f.NO_ERROR))
            self._streams.pop(sid)
            self._waiting_bodies.discard(sid)
        elif length:
            self._to_client.append(f.window_update(sid, length))
        return None

    def _client_headers(self, flags: int, sid: int, payload: bytes) -> None:
        fragment = f.strip_headers_payload(flags, payload)
        if fragment is None:
            return self._fail("client", f.PROTOCOL_ERROR, "HEADERS padding")
        if not sid or not sid & 1:
            return self._fail("client", f.PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        end_stream = bool(flags & f.FLAG_END_STREAM)
        if flags & f.FLAG_END_HEADERS:
            return self._client_block(sid, end_stream, fragment)
        self._cblock = [fragment]
        self._cblock_sid = sid
        self._cblock_end_stream = end_stream
        self._cblock_size = len(fragment)
        self._cblock_frames = 0
        if self._cblock_size > self.limits.max_header_block:
            return self._fail("client", f.ENHANCE_YOUR_CALM, "header block too large")
        return None

    def _client_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self._cblock is None or sid != self._cblock_sid:
            return self._fail("client", f.PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._cblock_frames += 1
        self._cblock_size += len(payload)
        if self._cblock_frames > self.limits.max_continuation_frames:
            return self._fail("client", f.ENHANCE_YOUR_CALM, "CONTINUATION flood")
        if self._cblock_size > self.limits.max_header_block:
            return self._fail("client", f.ENHANCE_YOUR_CALM, "header block too large")
        self._cblock.append(payload)
        if flags & f.FLAG_END_HEADERS:
            block = b"".join(self._cblock)
            self._cblock = None
            return self._client_block(sid, self._cblock_end_stream, block)
        return None

    def _decode_request_block(self, block: bytes) -> tuple | None:
        try:
            return self._requests.decode(block)
        except HeaderBlockError as exc:
            too_big = "larger than" in str(exc)
            code = f.ENHANCE_YOUR_CALM if too_big else f.COMPRESSION_ERROR
            self._fail("client", code, "header list too large" if too_big else str(exc))
            return None

    def _client_block(self, sid: int, end_stream: bool, block: bytes) -> None:
        if sid > self._max_client_sid:
            self._max_client_sid = sid
            return self._new_request(sid, end_stream, block)
        headers = self._decode_request_block(block)  # always: keeps the decoder in sync
        if headers is None:
            return None
        stream = self._streams.get(sid)
        if stream is None:
            if any(name[:1] == ":" for name, _ in headers):
                return self._fail("client", f.PROTOCOL_ERROR, f"stream {sid} reused")
            return None  # trailers racing a reset: ignored
        if not stream.client_open or not end_stream:
            code = f.STREAM_CLOSED if not stream.client_open else f.PROTOCOL_ERROR
            return self._reset_both(sid, stream, code)
        stream.client_open = False
        if not stream.forwarded:
            if not stream.server_open and not stream.body:
                del self._streams[sid]
            return None
        try:
            check_trailers(headers)
        except MalformedRequest:
            return self._reset_both(sid, stream, f.PROTOCOL_ERROR)
        self._to_server.append(
            f.headers_frames(sid, encode_fields(headers), True, self._server_max_frame)
        )
        if not stream.server_open:
            del self._streams[sid]
        return None

    def _reset_both(self, sid: int, stream: _Stream, code: int) -> None:
        """A stream error: RST_STREAM to the client, and to the server if it knows the stream."""
        self._to_client.append(f.rst_stream(sid, code))
        if stream.forwarded and stream.server_open:
            self._to_server.append(f.rst_stream(sid, f.CANCEL))
        self._streams.pop(sid, None)
        self._waiting_bodies.discard(sid)
        self._events.append(StreamEnded(sid, stream.status, reset_code=code, reset_by="proxy"))

    def _new_request(self, sid: int, end_stream: bool, block: bytes) -> None:
        generation = self._requests.generation
        if generation != self._entries_generation:
            self._entries_generation = generation
            self._entries.clear()
        entry = self._entries.get(block)
        if entry is None:
            headers = self._decode_request_block(block)
            if headers is None:
                return None
            entry = self._evaluate(headers)
            if self._requests.generation == generation:
                if len(self._entries) >= 512:
                    self._entries.clear()
                self._entries[block] = entry
            else:
                self._entries_generation = self._requests.generation
                self._entries.clear()
        return self._open_stream(sid, entry, end_stream)

    def _evaluate(self, headers: tuple[tuple[str, str], ...]) -> _Entry:
        lim = self.limits
        if len(headers) > lim.max_header_count or header_list_size(headers) > (
            lim.max_header_list_size
        ):
            return _Entry(_TOO_LARGE, reason="request header list too large")
        try:
            request = parse_request(headers)
        except MalformedRequest as exc:
            return _Entry(_MALFORMED, reason=str(exc))
        decision = self._decide(request)
        if not decision.allowed:
            return _Entry(_DENY, request, decision)
        return _Entry(_ALLOW, request, decision, encode_fields(decision.headers or headers))

    def _open_stream(self, sid: int, entry: _Entry, end_stream: bool) -> None:
        if len(self._streams) >= self.limits.max_concurrent_streams or self.draining:
            self._to_client.append(f.rst_stream(sid, f.REFUSED_STREAM))
            self._events.append(RequestRejected(sid, "too many streams", f.REFUSED_STREAM, 0))
            self._spend_reset()
            return None
        kind = entry.kind
        if kind == _ALLOW:
            block = entry.block
            stream = _Stream(True, not end_stream)
            self._streams[sid] = stream
            flags = f.FLAG_END_HEADERS | f.FLAG_END_STREAM if end_stream else f.FLAG_END_HEADERS
            if len(block) <= self._server_max_frame:
                self._to_server.append(f.frame_header(len(block), f.HEADERS, flags, sid) + block)
            else:
                self._to_server.append(
                    f.headers_frames(sid, block, end_stream, self._server_max_frame)
                )
            self._events.append(RequestReceived(sid, entry.request, entry.decision))
            return None
        if kind == _DENY:
            self._events.append(RequestReceived(sid, entry.request, entry.decision))
            if entry.request.is_grpc:
                self._respond_locally(sid, self._deny_grpc_block, b"", end_stream)
            else:
                self._respond_locally(sid, self._deny_http_block, self.limits.deny_body, end_stream)
            return None
        if kind == _TOO_LARGE:
            self._events.append(RequestRejected(sid, entry.reason, 0, 431))
            self._respond_locally(sid, self._too_large_block, b"", end_stream)
            return None
        self._events.append(RequestRejected(sid, entry.reason, f.PROTOCOL_ERROR, 0))
        self._to_client.append(f.rst_stream(sid, f.PROTOCOL_ERROR))
        return None

    def _respond_locally(self, sid: int, block: bytes, body: bytes, end_stream: bool) -> None:
        """Answer a stream without the server; the block uses no HPACK dynamic table. A request
        still sending its body keeps the stream until it ends (its DATA is credited back): some
        clients (curl) treat RST_STREAM(NO_ERROR) after a complete response as a failure."""
        self._to_client.append(f.headers_frames(sid, block, not body, self._client_max_frame))
        stream = _Stream(False, not end_stream)
        if body:
            stream.body = body
            stream.window = self._client_initial_window
            self._streams[sid] = stream
            self._send_local_body(sid, stream)
        elif stream.client_open:
            self._streams[sid] = stream

    def _send_local_body(self, sid: int, stream: _Stream) -> None:
        size = len(stream.body)
        if size > stream.window or size > self._client_conn_window:
            self._waiting_bodies.add(sid)
            return
        self._to_client.append(f.data_frame(sid, stream.body, True))
        self._client_conn_window -= size
        self._debt += size
        self._waiting_bodies.discard(sid)
        stream.body = b""
        if not stream.client_open:
            del self._streams[sid]

    def _client_window_update(self, sid, payload, buf, pos, fend) -> None:
        if len(payload) != 4:
            return self._fail("client", f.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
        if not sid:
            if not increment:
                return self._fail("client", f.PROTOCOL_ERROR, "zero WINDOW_UPDATE")
            self._client_conn_window += increment
            if self._client_conn_window > f.MAX_WINDOW:
                return self._fail("client", f.FLOW_CONTROL_ERROR, "connection window overflow")
            if self._debt:
                taken = min(self._debt, increment)
                self._debt -= taken
                if increment - taken:
                    self._to_server.append(f.window_update(0, increment - taken))
            else:
                self._to_server.append(buf[pos:fend])
            if self._held:
                self._release_held()
            if self._waiting_bodies:
                for waiting in sorted(self._waiting_bodies):
                    self._send_local_body(waiting, self._streams[waiting])
            return None
        if sid > self._max_client_sid:
            return self._fail("client", f.PROTOCOL_ERROR, "WINDOW_UPDATE on an idle stream")
        stream = self._streams.get(sid)
        if stream is None:
            return None
        if not increment:
            return self._reset_both(sid, stream, f.PROTOCOL_ERROR)
        if stream.forwarded:
            self._to_server.append(buf[pos:fend])
        elif stream.body:
            stream.window += increment
            self._send_local_body(sid, stream)
        return None

    def _client_rst(self, sid, payload, buf, pos, fend) -> None:
        if len(payload) != 4:
            return self._fail("client", f.FRAME_SIZE_ERROR, "RST_STREAM length")
        if not sid or sid > self._max_client_sid:
            return self._fail("client", f.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        stream = self._streams.pop(sid, None)
        if stream is None:
            return None
        self._waiting_bodies.discard(sid)
        code = int.from_bytes(payload, "big")
        self._events.append(StreamEnded(sid, stream.status, reset_code=code, reset_by="client"))
        if stream.forwarded:
            self._to_server.append(buf[pos:fend])
            if stream.server_open and not stream.status:
                self._spend_reset()
        return None

    def _client_settings_frame(self, flags, sid, payload, buf, pos, fend) -> None:
        if sid:
            return self._fail("client", f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.FLAG_ACK:
            if payload:
                return self._fail("client", f.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            self._to_server.append(buf[pos:fend])
            return None
        if len(payload) % 6:
            return self._fail("client", f.FRAME_SIZE_ERROR, "SETTINGS length")
        if self._client_settings_seen and not self._spend_control():
            return None
        self._client_settings_seen = True
        rewritten = self._client_settings(payload)
        if rewritten:
            self._to_server.append(rewritten)
        return None

    def _client_settings(self, payload: bytes) -> bytes:
        """Validate the client's SETTINGS and rewrite them for the server."""
        lim = self.limits
        out = []
        push_seen = table_seen = False
        for key, value in f.parse_settings(payload):
            if key == f.SETTINGS_ENABLE_PUSH:
                if value > 1:
                    self._fail("client", f.PROTOCOL_ERROR, "ENABLE_PUSH value")
                    return b""
                value = 0
                push_seen = True
            elif key == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    self._fail("client", f.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE value")
                    return b""
                delta = value - self._client_initial_window
                self._client_initial_window = value
                for waiting in sorted(self._waiting_bodies):
                    self._streams[waiting].window += delta
                    self._send_local_body(waiting, self._streams[waiting])
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME_SIZE <= value <= f.MAX_FRAME_SIZE_LIMIT:
                    self._fail("client", f.PROTOCOL_ERROR, "MAX_FRAME_SIZE value")
                    return b""
                value = min(value, lim.max_frame_size)
                self._client_max_frame = value
            elif key == f.SETTINGS_HEADER_TABLE_SIZE:
                table_seen = True
                value = min(value, lim.response_header_table_size)
            out.append((key, value))
        if not push_seen:
            out.append((f.SETTINGS_ENABLE_PUSH, 0))
        if not table_seen and lim.response_header_table_size < 4096:
            out.append((f.SETTINGS_HEADER_TABLE_SIZE, lim.response_header_table_size))
        return f.settings_frame(out)

    # ----------------------------------------------------------------- server -> client

    def receive_server(self, data: bytes) -> list:
        if self.closed:
            return _NO_EVENTS
        buf = self._sbuf + data if self._sbuf else data
        end = len(buf)
        pos = 0
        run = -1  # start of a run of frames forwarded unchanged
        out = self._to_client
        max_frame = self.limits.max_frame_size
        streams = self._streams
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > max_frame:
                self._fail("server", f.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                break
            fend = pos + 9 + length
            if fend > end:
                break
            ftype = buf[pos + 3]
            flags = buf[pos + 4]
            sid = int.from_bytes(buf[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
            if self._held or self._sblock is not None or not self._server_settings_seen:
                pass  # slow path below
            elif ftype == 0:
                if self._debt and length > self._client_conn_window:
                    pass  # would overrun the window the proxy borrowed from: hold it
                else:
                    self._client_conn_window -= length
                    if flags & 1:
                        stream = streams.get(sid)
                        if stream is not None:
                            self._server_stream_done(sid, stream, None)
                    if run < 0:
                        run = pos
                    pos = fend
                    continue
            elif ftype == 1 and flags & 0x2C == 4:
                self._server_block(sid, flags & 1, buf[pos + 9 : fend])
                if self.closed:
                    break
                if run < 0:
                    run = pos
                pos = fend
                continue
            if run >= 0:
                out.append(buf[run:pos])
                run = -1
            self._server_frame(ftype, flags, sid, buf[pos + 9 : fend], buf[pos:fend])
            if self.closed:
                break
            pos = fend
        if run >= 0 and not self.closed:
            out.append(buf[run:pos])
        self._sbuf = buf[pos:] if pos < end and not self.closed else b""
        if self.draining and not self._streams:
            self.closed = True  # graceful: the last stream finished after GOAWAY
        return self._take_events()

    def _emit_to_client(self, raw: bytes, data_length: int = -1) -> None:
        """Server bytes towards the client, in order, behind anything held back."""
        if (
            data_length >= 0
            and not self._held
            and (not self._debt or data_length <= self._client_conn_window)
        ):
            self._client_conn_window -= data_length
            self._to_client.append(raw)
            return
        if data_length < 0 and not self._held:
            self._to_client.append(raw)
            return
        self._held.append((data_length, raw))
        self._held_bytes += len(raw)
        if self._held_bytes > self.limits.max_held_bytes:
            self._fail("server", f.FLOW_CONTROL_ERROR, "server overran the client's window")

    def _release_held(self) -> None:
        held = self._held
        while held:
            data_length, raw = held[0]
            if data_length > self._client_conn_window:
                break
            held.pop(0)
            self._held_bytes -= len(raw)
            if data_length > 0:
                self._client_conn_window -= data_length
            self._to_client.append(raw)

    def _server_frame(self, ftype, flags, sid, payload, raw) -> None:
        if not self._server_settings_seen and (ftype != f.SETTINGS or flags & f.FLAG_ACK):
            return self._fail("server", f.PROTOCOL_ERROR, "upstream did not start with SETTINGS")
        if self._sblock is not None:
            if ftype != f.CONTINUATION or sid != self._sblock_sid:
                return self._fail("server", f.PROTOCOL_ERROR, "frame inside a header block")
            self._sblock.append(raw)
            self._sblock_parts.append(payload)
            self._sblock_size += len(payload)
            if self._sblock_size > self.limits.max_header_block or len(self._sblock) > (
                self.limits.max_continuation_frames + 1
            ):
                return self._fail("server", f.ENHANCE_YOUR_CALM, "response header block too large")
            if flags & f.FLAG_END_HEADERS:
                frames, parts = self._sblock, self._sblock_parts
                self._sblock = None
                self._sblock_parts = []
                self._server_block(self._sblock_sid, self._sblock_end_stream, b"".join(parts))
                if not self.closed:
                    self._emit_to_client(b"".join(frames))
            return None
        if ftype == f.DATA:
            if flags & f.FLAG_END_STREAM:
                stream = self._streams.get(sid)
                if stream is not None:
                    self._server_stream_done(sid, stream, None)
            return self._emit_to_client(raw, len(payload))
        if ftype == f.HEADERS:
            block = f.strip_headers_payload(flags, payload)
            if block is None:
                return self._fail("server", f.PROTOCOL_ERROR, "HEADERS padding")
            if flags & f.FLAG_END_HEADERS:
                self._server_block(sid, flags & f.FLAG_END_STREAM, block)
                if not self.closed:
                    self._emit_to_client(raw)
                return None
            self._sblock = [raw]
            self._sblock_parts = [block]
            self._sblock_sid = sid
            self._sblock_end_stream = bool(flags & f.FLAG_END_STREAM)
            self._sblock_size = len(block)
            return None
        if ftype == f.SETTINGS:
            if sid:
                return self._fail("server", f.PROTOCOL_ERROR, "SETTINGS on a stream")
            if flags & f.FLAG_ACK:
                if self._swallow_server_acks:
                    self._swallow_server_acks -= 1
                    return None
                return self._emit_to_client(raw)
            if len(payload) % 6:
                return self._fail("server", f.FRAME_SIZE_ERROR, "SETTINGS length")
            first = not self._server_settings_seen
            settings = self._server_settings(payload)
            if settings and first:
                self._to_client.insert(0, settings)  # before anything the proxy queued
            elif settings:
                self._emit_to_client(settings)
            return None
        if ftype == f.WINDOW_UPDATE:
            return self._emit_to_client(raw)
        if ftype == f.RST_STREAM:
            if len(payload) != 4 or not sid:
                return self._fail("server", f.PROTOCOL_ERROR, "malformed RST_STREAM")
            stream = self._streams.pop(sid, None)
            if stream is not None:
                code = int.from_bytes(payload, "big")
                self._events.append(
                    StreamEnded(sid, stream.status, reset_code=code, reset_by="server")
                )
            return self._emit_to_client(raw)
        if ftype == f.PING:
            if len(payload) != 8 or sid:
                return self._fail("server", f.PROTOCOL_ERROR, "malformed PING")
            if not flags & f.FLAG_ACK:
                self._to_server.append(f.ping_ack(payload))
            return None
        if ftype == f.GOAWAY:
            if sid or len(payload) < 8:
                return self._fail("server", f.PROTOCOL_ERROR, "malformed GOAWAY")
            last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
            if self._server_goaway_last is None or last < self._server_goaway_last:
                self._server_goaway_last = last
            self._events.append(GoawayReceived("server", last, int.from_bytes(payload[4:8], "big")))
            return self._emit_to_client(raw)
        if ftype == f.PUSH_PROMISE:
            return self._fail("server", f.PROTOCOL_ERROR, "PUSH_PROMISE although push is off")
        if ftype == f.CONTINUATION:
            return self._fail("server", f.PROTOCOL_ERROR, "unexpected CONTINUATION")
        return None  # PRIORITY and unknown types are dropped

    def _server_block(self, sid: int, end_stream: int, block: bytes) -> None:
        summary = self._response_summaries.get(block)
        if summary is None:
            summary = self._summarize_response(block)
            if summary is None:
                return None
        stream = self._streams.get(sid)
        if stream is None:
            return None
        status = summary[0]
        if status and not stream.status:
            stream.status = status
        if end_stream:
            self._server_stream_done(sid, stream, summary[1], summary[2])
        return None

    def _summarize_response(self, block: bytes) -> tuple | None:
        """(final status or 0, grpc-status, grpc-message) of a server header block, memoized
        while the response decoder's table stays unchanged (always, with a zero-size table)."""
        generation = self._responses.generation
        try:
            headers = self._responses.decode(block)
        except HeaderBlockError as exc:
            self._fail("server", f.COMPRESSION_ERROR, str(exc))
            return None
        status = 0
        grpc_status = grpc_message = None
        for name, value in headers:
            if name == ":status":
                if value[:1] != "1" and value.isdigit():
                    status = int(value)
            elif name == "grpc-status":
                grpc_status = value
            elif name == "grpc-message":
                grpc_message = value
        summary = (status, grpc_status, grpc_message)
        summaries = self._response_summaries
        if self._responses.generation != generation:
            summaries.clear()
        else:
            if len(summaries) >= 512:
                summaries.clear()
            summaries[block] = summary
        return summary

    def _server_stream_done(
        self, sid: int, stream: _Stream, grpc_status: str | None, grpc_message: str | None = None
    ) -> None:
        stream.server_open = False
        if not stream.client_open:
            del self._streams[sid]
        self._events.append(StreamEnded(sid, stream.status, grpc_status, grpc_message))

    def _server_settings(self, payload: bytes) -> bytes:
        lim = self.limits
        out = []
        for key, value in f.parse_settings(payload):
            if key == f.SETTINGS_MAX_CONCURRENT_STREAMS:
                value = min(value, lim.max_concurrent_streams)
                self._server_concurrency_sent = True
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.DEFAULT_MAX_FRAME_SIZE <= value <= f.MAX_FRAME_SIZE_LIMIT:
                    self._fail("server", f.PROTOCOL_ERROR, "MAX_FRAME_SIZE value")
                    return b""
                value = min(value, lim.max_frame_size)
                self._server_max_frame = value
            elif key == f.SETTINGS_HEADER_TABLE_SIZE:
                value = min(value, lim.max_header_table_size)
                self._requests.allow_table_size(value)
            elif key == f.SETTINGS_MAX_HEADER_LIST_SIZE:
                value = min(value, lim.max_header_list_size)
            elif key == f.SETTINGS_INITIAL_WINDOW_SIZE and value > f.MAX_WINDOW:
                self._fail("server", f.FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE value")
                return b""
            out.append((key, value))
        if not self._server_settings_seen:
            self._server_settings_seen = True
            if not self._server_concurrency_sent:
                out.append((f.SETTINGS_MAX_CONCURRENT_STREAMS, lim.max_concurrent_streams))
                self._server_concurrency_sent = True
        return f.settings_frame(out)
