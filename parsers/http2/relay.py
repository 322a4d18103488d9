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
from parsers.http2.client_side import ClientSide
from parsers.http2.events import ConnectionFailed, Decision, H2Limits, StreamEnded
from parsers.http2.grpc import denied_trailers_only
from parsers.http2.headers import CachingDecoder, Request, encode_fields
from parsers.http2.server_side import ServerSide
from parsers.http2.streams import (
    AFTER_CLIENT_END,
    ALLOW,
    CLIENT_END,
    CLIENT_FORWARDED,
    CLIENT_SENDING,
    CLOSED,
    PROXY_RESET,
    SERVER_EVENTS,
    SERVER_RESET,
    TRANSITIONS,
    Evaluation,
    Stream,
)

_NO_EVENTS: list = []


class H2Relay(ClientSide, ServerSide):
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
        self._entries: dict[bytes, Evaluation] = {}
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
        self._bad_target_block = encode_fields(((":status", "400"), ("content-length", "0")))

        self._cbuf = b""
        self._sbuf = b""
        self._to_client: list[bytes] = []
        self._to_server: list[bytes] = []
        self._events: list = []
        self._streams: dict[int, Stream] = {}
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
        self._cblock_self_dependent = False
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
        # MAX_CONCURRENT_STREAMS and MAX_FRAME_SIZE in force for the client, and those relayed
        # to it but not yet ACKed: (streams or None, frame size or None) per SETTINGS frame.
        self._stream_limit = limits.max_concurrent_streams
        self._frame_limit_acked = f.DEFAULT_MAX_FRAME_SIZE
        # The largest frame the client may send now: the ACKed value, or a larger one it may
        # already use because it was sent (RFC 9113 6.5.3: it applies once the client has it).
        self._client_frame_limit = f.DEFAULT_MAX_FRAME_SIZE
        self._unacked_limits: list[tuple[int | None, int | None]] = []
        # Closed streams the server or the proxy reset: the client's DATA may still be in
        # flight on them (dropped), unlike on streams the client ended or reset (STREAM_CLOSED).
        self._reset_streams: dict[int, None] = {}
        self._reset_memory = max(1024, 4 * limits.max_concurrent_streams)
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
        forwarded_body = bool(body) and entry.kind == ALLOW
        self._open_stream(1, entry, end_stream=not forwarded_body)
        stream = self._streams.get(1)
        if forwarded_body and stream is not None:
            step = self._server_max_frame
            for i in range(0, len(body), step):
                self._to_server.append(f.data_frame(1, body[i : i + step], i + step >= len(body)))
            self._advance(1, stream, CLIENT_END)
        return self._take_events()

    # ----------------------------------------------------------------- stream bookkeeping

    def _advance(self, sid: int, stream: Stream, event: str) -> bool:
        """Move a stream along the state table (streams.py). An event the table lacks is an
        error of whoever sent it: from the client a stream error (STREAM_CLOSED once it had
        ended its side, PROTOCOL_ERROR before); from the server, which ended a stream twice or
        spoke on one it never saw, a connection error."""
        state = TRANSITIONS.get((stream.state, event))
        if state is None:
            if event in SERVER_EVENTS:
                self._fail("server", f.PROTOCOL_ERROR, f"{event} on stream {sid} in a wrong state")
            else:
                code = f.PROTOCOL_ERROR if stream.state in CLIENT_SENDING else f.STREAM_CLOSED
                self._reset_both(sid, stream, code)
            return False
        if state == CLOSED:
            self._close_stream(sid, stream, event)
        else:
            stream.state = state
        return True

    def _close_stream(self, sid: int, stream: Stream, event: str) -> None:
        """The state table said CLOSED: forget the stream, remembering a reset by the server or
        the proxy (the client may have DATA in flight on it)."""
        stream.state = CLOSED
        self._streams.pop(sid, None)
        self._waiting_bodies.discard(sid)
        if event is PROXY_RESET or event is SERVER_RESET:
            self._remember_reset(sid)

    def _remember_reset(self, sid: int) -> None:
        resets = self._reset_streams
        resets[sid] = None
        if len(resets) > self._reset_memory:
            del resets[next(iter(resets))]  # the oldest: its in-flight DATA is long past

    def _client_acked_limits(self) -> None:
        """The client ACKed the oldest SETTINGS the relay sent it: its limits apply now."""
        streams, frame_size = self._unacked_limits.pop(0)
        if streams is not None:
            self._stream_limit = streams
        if frame_size is not None:
            self._frame_limit_acked = frame_size
        pending = [size for _, size in self._unacked_limits if size is not None]
        self._client_frame_limit = max([self._frame_limit_acked, *pending])

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
        max_frame = self._client_frame_limit
        streams = self._streams
        # The frame-header loop below and the one in receive_server look alike on purpose: each
        # is one direction's hot path with its own fast cases inlined; a shared helper would add
        # a Python call per frame on the path every request and response takes.
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
                # DATA of a forwarded stream without a content-length to count passes as is.
                if stream is not None and stream.state in CLIENT_FORWARDED and stream.remaining < 0:
                    if not length and not flags & 1 and not self._spend_control():
                        break
                    if (
                        flags & 1
                    ):  # (the table's CLIENT_END row, inlined; OPEN and SERVER_DONE have it)
                        state = AFTER_CLIENT_END[stream.state]
                        stream.state = state
                        if state == CLOSED:
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
            self._client_frame(ftype, flags, sid, buf[pos + 9 : fend], buf[pos:fend])
            if self.closed:
                break
            pos = fend
            max_frame = self._client_frame_limit  # a SETTINGS ACK may have changed it
        if run >= 0 and not self.closed:
            out.append(buf[run:pos])
        self._cbuf = buf[pos:] if pos < end and not self.closed else b""
        if self.draining and not self._streams:
            self.closed = True  # graceful: the last stream finished after GOAWAY
        return self._take_events()

    # ----------------------------------------------------------------- server -> client

    def receive_server(self, data: bytes) -> list:
        if self.closed:
            return _NO_EVENTS
        if not self._server_settings_seen and (self._sbuf + data)[:5] == b"HTTP/":
            self._fail("server", f.PROTOCOL_ERROR, "upstream answered in HTTP/1, not HTTP/2")
            return self._take_events()
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
                    stream = streams.get(sid)
                    if stream is not None:
                        stream.window -= length
                        if flags & 1:
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
