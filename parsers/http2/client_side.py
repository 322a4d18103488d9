"""Frames from the client: requests through the policy, local answers, client control frames.

A mixin of `H2Relay` (relay.py holds the state, the hot loops and the connection-level control);
every method here runs inside `receive_client` or `start_upgraded`.
"""

from __future__ import annotations

from dataclasses import replace

from parsers.http2 import frames as f
from parsers.http2.client_control import ClientControl
from parsers.http2.events import (
    PrefaceReceived,
    RequestReceived,
    RequestRejected,
    StreamEnded,
)
from parsers.http2.headers import (
    HeaderBlockError,
    MalformedRequest,
    check_trailers,
    encode_fields,
    header_list_size,
    parse_request,
)
from parsers.http2.streams import (
    ALLOW,
    BAD_TARGET,
    BODY_SENT,
    CLIENT_DATA,
    CLIENT_DONE,
    CLIENT_END,
    CLIENT_HEADERS,
    CLIENT_SENDING,
    CLOSED,
    DENY,
    FORWARDED,
    LOCAL_BODY,
    LOCAL_BODY_OPEN,
    LOCAL_OPEN,
    MALFORMED,
    OPEN,
    PROXY_RESET,
    TOO_LARGE,
    Evaluation,
    Stream,
)
from parsers.http_path import BadTarget, normalize_target


class ClientSide(ClientControl):
    """Client-to-server handling of `H2Relay` (state attributes live in `H2Relay.__init__`):
    requests, their bodies and the answers the proxy gives itself; the control frames are in
    `ClientControl`."""

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

    def _client_frame(self, ftype: int, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        """A client frame the hot loop left to the handler table (`_CLIENT_FRAMES`, built at
        the end of this class); unknown frame types are ignored (RFC 9113 section 4.1)."""
        if self._cblock is not None and ftype != f.CONTINUATION:
            return self._fail("client", f.PROTOCOL_ERROR, "frame inside a header block")
        if not self._client_settings_seen and (ftype != f.SETTINGS or flags & f.FLAG_ACK):
            return self._fail("client", f.PROTOCOL_ERROR, "first frame is not SETTINGS")
        handler = self._CLIENT_FRAMES.get(ftype)
        if handler is None:
            self._spend_control()
            return None
        return handler(self, flags, sid, payload, raw)

    def _client_data(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        """DATA the hot loop did not forward: a stream with a content-length to count, a denied
        or closed stream, or a protocol error. DATA the server must not see still counts against
        the client's windows, so the relay returns those bytes itself."""
        if not sid:
            return self._fail("client", f.PROTOCOL_ERROR, "DATA on stream 0")
        if sid > self._max_client_sid:
            return self._fail("client", f.PROTOCOL_ERROR, "DATA on an idle stream")
        length = len(payload)
        end_stream = flags & f.FLAG_END_STREAM
        if not length and not end_stream and not self._spend_control():
            return None
        size = length  # the body octets, without padding (RFC 9113 6.1)
        if flags & f.FLAG_PADDED:
            if not length or payload[0] >= length:
                return self._fail("client", f.PROTOCOL_ERROR, "DATA padding")
            size = length - 1 - payload[0]
        stream = self._streams.get(sid)
        if stream is None:
            self._credit += length
            if sid in self._reset_streams:
                return None  # sent before the client learnt of the reset: dropped
            return self._stream_error(sid, f.STREAM_CLOSED)  # it closed the stream itself
        if stream.remaining >= 0 and stream.state in CLIENT_SENDING:
            stream.remaining -= size
            if stream.remaining < 0 or (end_stream and stream.remaining):
                # RFC 9113 8.1.1: a body that does not match its content-length is malformed;
                # this frame and the END_STREAM never reach the server.
                self._credit += length
                return self._reset_both(sid, stream, f.PROTOCOL_ERROR)
        forwarded = stream.state in FORWARDED
        if not self._advance(sid, stream, CLIENT_END if end_stream else CLIENT_DATA):
            self._credit += length
            return None
        if forwarded:
            self._to_server.append(raw)
            return None
        self._credit += length
        if end_stream or stream.state == CLOSED:
            return None
        # The body of a denied request is read and dropped (like HTTP/1), up to a limit.
        stream.discarded += length
        if stream.discarded > self.limits.max_discarded_body:
            self._to_client.append(f.rst_stream(sid, f.NO_ERROR))
            self._advance(sid, stream, PROXY_RESET)
        elif length:
            self._to_client.append(f.window_update(sid, length))
        return None

    def _client_headers(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        fragment = f.strip_headers_payload(flags, payload)
        if fragment is None:
            return self._fail("client", f.PROTOCOL_ERROR, "HEADERS padding")
        if not sid or not sid & 1:
            return self._fail("client", f.PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        self_dependent = False
        if flags & f.FLAG_PRIORITY:
            at = 1 if flags & f.FLAG_PADDED else 0  # (strip_headers_payload checked the length)
            self_dependent = f.stream_dependency(payload[at : at + 4]) == sid
        end_stream = bool(flags & f.FLAG_END_STREAM)
        if flags & f.FLAG_END_HEADERS:
            return self._client_block(sid, end_stream, fragment, self_dependent)
        self._cblock = [fragment]
        self._cblock_sid = sid
        self._cblock_end_stream = end_stream
        self._cblock_self_dependent = self_dependent
        self._cblock_size = len(fragment)
        self._cblock_frames = 0
        if self._cblock_size > self.limits.max_header_block:
            return self._fail("client", f.ENHANCE_YOUR_CALM, "header block too large")
        return None

    def _client_continuation(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
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
            return self._client_block(
                sid, self._cblock_end_stream, block, self._cblock_self_dependent
            )
        return None

    def _decode_request_block(self, block: bytes) -> tuple | None:
        try:
            return self._requests.decode(block)
        except HeaderBlockError as exc:
            code = f.ENHANCE_YOUR_CALM if exc.too_large else f.COMPRESSION_ERROR
            self._fail("client", code, "header list too large" if exc.too_large else str(exc))
            return None

    def _client_block(
        self, sid: int, end_stream: bool, block: bytes, self_dependent: bool = False
    ) -> None:
        if sid > self._max_client_sid:
            self._max_client_sid = sid
            if not self_dependent:
                return self._new_request(sid, end_stream, block)
            if self._decode_request_block(block) is not None:  # keeps the decoder in sync
                self._reject(sid, "stream depends on itself", f.PROTOCOL_ERROR)
            return None
        headers = self._decode_request_block(block)  # always: keeps the decoder in sync
        if headers is None:
            return None
        stream = self._streams.get(sid)
        if stream is None:
            if any(name[:1] == ":" for name, _ in headers):
                return self._fail("client", f.PROTOCOL_ERROR, f"stream {sid} reused")
            if self_dependent:
                return self._stream_error(sid, f.PROTOCOL_ERROR)
            return None  # trailers racing a reset: ignored
        if self_dependent:
            return self._reset_both(sid, stream, f.PROTOCOL_ERROR)
        if not end_stream:
            self._advance(sid, stream, CLIENT_HEADERS)  # in no row: a stream error
            return None
        forwarded = stream.state in FORWARDED
        if stream.state in CLIENT_SENDING:
            if stream.remaining > 0:
                return self._reset_both(sid, stream, f.PROTOCOL_ERROR)  # body short of its length
            if forwarded:
                try:
                    check_trailers(headers)
                except MalformedRequest:
                    return self._reset_both(sid, stream, f.PROTOCOL_ERROR)
        if not self._advance(sid, stream, CLIENT_END) or not forwarded:
            return None
        self._to_server.append(
            f.headers_frames(sid, encode_fields(headers), True, self._server_max_frame)
        )
        return None

    def _reset_both(self, sid: int, stream: Stream, code: int) -> None:
        """A stream error: RST_STREAM to the client, and to the server if it knows the stream."""
        self._to_client.append(f.rst_stream(sid, code))
        if stream.state in FORWARDED:
            self._to_server.append(f.rst_stream(sid, f.CANCEL))
        self._close_stream(sid, stream, PROXY_RESET)
        self._events.append(StreamEnded(sid, stream.status, reset_code=code, reset_by="proxy"))

    def _stream_error(self, sid: int, code: int) -> None:
        """A stream error on a stream the relay does not track (idle or closed)."""
        if self._spend_control():
            self._to_client.append(f.rst_stream(sid, code))
            self._remember_reset(sid)

    def _reject(self, sid: int, reason: str, code: int) -> None:
        """A new stream reset by the proxy before anything reached the server."""
        self._to_client.append(f.rst_stream(sid, code))
        self._remember_reset(sid)
        self._events.append(RequestRejected(sid, reason, code, 0))

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

    def _evaluate(self, headers: tuple[tuple[str, str], ...]) -> Evaluation:
        lim = self.limits
        if len(headers) > lim.max_header_count or header_list_size(headers) > (
            lim.max_header_list_size
        ):
            return Evaluation(TOO_LARGE, reason="request header list too large")
        try:
            request = parse_request(headers)
        except MalformedRequest as exc:
            return Evaluation(MALFORMED, reason=str(exc))
        path = request.path
        if path:  # (a plain CONNECT has no :path)
            try:
                normalized = normalize_target(
                    path, request.method, absolute_form=False, slashes=lim.path_escaped_slashes
                )
            except BadTarget as exc:
                return Evaluation(BAD_TARGET, request, reason=str(exc))
            if normalized is not path:
                # The policy decides on the normalized :path and the server gets that one.
                headers = tuple(
                    (n, normalized) if n == ":path" else (n, v) for n, v in request.headers
                )
                request = replace(request, path=normalized, headers=headers)
        decision = self._decide(request)
        if not decision.allowed:
            return Evaluation(DENY, request, decision)
        return Evaluation(ALLOW, request, decision, encode_fields(decision.headers or headers))

    def _open_stream(self, sid: int, entry: Evaluation, end_stream: bool) -> None:
        if len(self._streams) >= self._stream_limit or self.draining:
            self._reject(sid, "too many streams", f.REFUSED_STREAM)
            self._spend_reset()
            return None
        kind = entry.kind
        remaining = -1  # request body bytes due by its content-length (-1: none to count)
        request = entry.request
        if request is not None and request.content_length >= 0:
            if not end_stream:
                remaining = request.content_length
            elif request.content_length:
                kind = MALFORMED  # END_STREAM on the head, but a content-length promised a body
        if kind == ALLOW:
            block = entry.block
            stream = Stream(
                CLIENT_DONE if end_stream else OPEN, self._client_initial_window, remaining
            )
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
        if kind == DENY:
            self._events.append(RequestReceived(sid, entry.request, entry.decision))
            if entry.request.is_grpc:
                self._respond_locally(sid, self._deny_grpc_block, b"", end_stream, remaining)
            else:
                body = self.limits.deny_body
                self._respond_locally(sid, self._deny_http_block, body, end_stream, remaining)
            return None
        if kind == BAD_TARGET:
            self._events.append(RequestRejected(sid, entry.reason, 0, 400))
            self._respond_locally(sid, self._bad_target_block, b"", end_stream, remaining)
            return None
        if kind == TOO_LARGE:
            self._events.append(RequestRejected(sid, entry.reason, 0, 431))
            self._respond_locally(sid, self._too_large_block, b"", end_stream)
            return None
        reason = entry.reason if entry.kind == MALFORMED else "content-length without a body"
        self._reject(sid, reason, f.PROTOCOL_ERROR)
        return None

    def _respond_locally(
        self, sid: int, block: bytes, body: bytes, end_stream: bool, remaining: int = -1
    ) -> None:
        """Answer a stream without the server; the block uses no HPACK dynamic table. A request
        still sending its body keeps the stream until it ends (its DATA is credited back): some
        clients (curl) treat RST_STREAM(NO_ERROR) after a complete response as a failure."""
        self._to_client.append(f.headers_frames(sid, block, not body, self._client_max_frame))
        if body:
            state = LOCAL_BODY if end_stream else LOCAL_BODY_OPEN
        elif not end_stream:
            state = LOCAL_OPEN
        else:
            return None  # answered, and the client is done: nothing to track
        stream = Stream(state, self._client_initial_window, remaining)
        self._streams[sid] = stream
        if body:
            stream.body = body
            self._send_local_body(sid, stream)
        return None

    def _send_local_body(self, sid: int, stream: Stream) -> None:
        size = len(stream.body)
        if size > stream.window or size > self._client_conn_window:
            self._waiting_bodies.add(sid)
            return
        self._to_client.append(f.data_frame(sid, stream.body, True))
        self._client_conn_window -= size
        stream.window -= size
        self._debt += size
        self._waiting_bodies.discard(sid)
        stream.body = b""
        self._advance(sid, stream, BODY_SENT)

    # One handler per frame type, each (self, flags, stream id, payload, raw frame).
    _CLIENT_FRAMES = {
        f.DATA: _client_data,
        f.HEADERS: _client_headers,
        f.PRIORITY: ClientControl._client_priority,
        f.RST_STREAM: ClientControl._client_rst,
        f.SETTINGS: ClientControl._client_settings_frame,
        f.PUSH_PROMISE: ClientControl._client_push_promise,
        f.PING: ClientControl._client_ping,
        f.GOAWAY: ClientControl._client_goaway,
        f.WINDOW_UPDATE: ClientControl._client_window_update,
        f.CONTINUATION: _client_continuation,
    }
