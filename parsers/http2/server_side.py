"""Frames from the server: responses passed through raw, the status they carry, server control.

A mixin of `H2Relay` (relay.py holds the state and the hot loops); every method here runs inside
`receive_server` or a client WINDOW_UPDATE that releases held data.
"""

from __future__ import annotations

from parsers.http2 import frames as f
from parsers.http2.events import GoawayReceived, StreamEnded
from parsers.http2.headers import HeaderBlockError
from parsers.http2.streams import (
    AFTER_SERVER_END,
    CLOSED,
    FORWARDED,
    SERVER_END,
    SERVER_RESET,
    Stream,
)


class ServerSide:
    """Server-to-client handling of `H2Relay` (state attributes live in `H2Relay.__init__`)."""

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

    def _server_frame(self, ftype: int, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        """A server frame the hot loop left to the handler table (`_SERVER_FRAMES`, at the end
        of this class); PRIORITY and unknown frame types are dropped."""
        if not self._server_settings_seen and (ftype != f.SETTINGS or flags & f.FLAG_ACK):
            return self._fail("server", f.PROTOCOL_ERROR, "upstream did not start with SETTINGS")
        if self._sblock is not None:
            if ftype != f.CONTINUATION or sid != self._sblock_sid:
                return self._fail("server", f.PROTOCOL_ERROR, "frame inside a header block")
            return self._server_continuation(flags, sid, payload, raw)
        handler = self._SERVER_FRAMES.get(ftype)
        if handler is not None:
            return handler(self, flags, sid, payload, raw)
        return None

    def _server_continuation(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if self._sblock is None:
            return self._fail("server", f.PROTOCOL_ERROR, "unexpected CONTINUATION")
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

    def _server_data(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        stream = self._streams.get(sid)
        if stream is not None:
            stream.window -= len(payload)
            if flags & f.FLAG_END_STREAM:
                self._server_stream_done(sid, stream, None)
                if self.closed:
                    return None
        return self._emit_to_client(raw, len(payload))

    def _server_headers(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
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

    def _server_settings_frame(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
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

    def _server_window_update(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if len(payload) != 4:
            return self._fail("server", f.FRAME_SIZE_ERROR, "WINDOW_UPDATE length")
        return self._emit_to_client(raw)

    def _server_rst(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if len(payload) != 4 or not sid:
            return self._fail("server", f.PROTOCOL_ERROR, "malformed RST_STREAM")
        stream = self._streams.get(sid)
        if stream is not None:
            if not self._advance(sid, stream, SERVER_RESET):
                return None
            code = int.from_bytes(payload, "big")
            self._events.append(StreamEnded(sid, stream.status, reset_code=code, reset_by="server"))
        return self._emit_to_client(raw)

    def _server_ping(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if len(payload) != 8 or sid:
            return self._fail("server", f.PROTOCOL_ERROR, "malformed PING")
        if not flags & f.FLAG_ACK:
            self._to_server.append(f.ping_ack(payload))
        return None

    def _server_goaway(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if sid or len(payload) < 8:
            return self._fail("server", f.PROTOCOL_ERROR, "malformed GOAWAY")
        last = int.from_bytes(payload[:4], "big") & 0x7FFFFFFF
        if self._server_goaway_last is None or last < self._server_goaway_last:
            self._server_goaway_last = last
        self._events.append(GoawayReceived("server", last, int.from_bytes(payload[4:8], "big")))
        return self._emit_to_client(raw)

    def _server_push_promise(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        return self._fail("server", f.PROTOCOL_ERROR, "PUSH_PROMISE although push is off")

    def _server_block(self, sid: int, end_stream: int, block: bytes) -> None:
        summary = self._response_summaries.get(block)
        if summary is None:
            summary = self._summarize_response(block)
            if summary is None:
                return None
        stream = self._streams.get(sid)
        if stream is None:
            return None
        if stream.state not in FORWARDED:
            return self._fail("server", f.PROTOCOL_ERROR, f"HEADERS on stream {sid} it never saw")
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
        self, sid: int, stream: Stream, grpc_status: str | None, grpc_message: str | None = None
    ) -> None:
        state = AFTER_SERVER_END.get(stream.state)  # (the table's SERVER_END row, inlined)
        if state == CLOSED:
            del self._streams[sid]
            stream.state = CLOSED
        elif state is not None:
            stream.state = state
        elif not self._advance(sid, stream, SERVER_END):  # not in the table: an error
            return
        self._events.append(StreamEnded(sid, stream.status, grpc_status, grpc_message))

    def _server_settings(self, payload: bytes) -> bytes:
        lim = self.limits
        out = []
        concurrency = frame_size = None
        for key, value in f.parse_settings(payload):
            if key == f.SETTINGS_MAX_CONCURRENT_STREAMS:
                value = concurrency = min(value, lim.max_concurrent_streams)
                self._server_concurrency_sent = True
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                value = frame_size = f.capped_max_frame_size(value, lim.max_frame_size)
                if not value:
                    self._fail("server", f.PROTOCOL_ERROR, "MAX_FRAME_SIZE value")
                    return b""
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
        # The client must keep to a new limit once it acknowledged it (RFC 9113 6.5.3); the
        # relay enforces it from that ACK on, so the server never sees more than it allowed. A
        # larger frame size may be used as soon as the client has read it.
        self._unacked_limits.append((concurrency, frame_size))
        if frame_size is not None and frame_size > self._client_frame_limit:
            self._client_frame_limit = frame_size
        return f.settings_frame(out)

    # One handler per frame type, each (self, flags, stream id, payload, raw frame).
    _SERVER_FRAMES = {
        f.DATA: _server_data,
        f.HEADERS: _server_headers,
        f.RST_STREAM: _server_rst,
        f.SETTINGS: _server_settings_frame,
        f.PUSH_PROMISE: _server_push_promise,
        f.PING: _server_ping,
        f.GOAWAY: _server_goaway,
        f.WINDOW_UPDATE: _server_window_update,
        f.CONTINUATION: _server_continuation,
    }
