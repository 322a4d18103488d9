"""Control frames from the client: PING, PRIORITY, GOAWAY, PUSH_PROMISE, WINDOW_UPDATE, RST_STREAM
and SETTINGS (validated, then rewritten for the server), and the window bookkeeping they drive.

A mixin of `H2Relay` through `ClientSide`; the state attributes live in `H2Relay.__init__`.
"""

from __future__ import annotations

from parsers.http2 import frames as f
from parsers.http2.events import GoawayReceived, StreamEnded
from parsers.http2.streams import CLIENT_RESET, FORWARDED, SERVER_SENDING


class ClientControl:
    """Client control-frame handlers, each (self, flags, stream id, payload, raw frame)."""

    def _client_ping(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if len(payload) != 8:
            return self._fail("client", f.FRAME_SIZE_ERROR, "PING length")
        if sid:
            return self._fail("client", f.PROTOCOL_ERROR, "PING on a stream")
        if not flags & f.FLAG_ACK and self._spend_control():
            self._to_client.append(f.ping_ack(payload))
        return None

    def _client_priority(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if not sid:
            return self._fail("client", f.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            return self._stream_error(sid, f.FRAME_SIZE_ERROR)
        if f.stream_dependency(payload[:4]) == sid:
            stream = self._streams.get(sid)
            if stream is not None:
                return self._reset_both(sid, stream, f.PROTOCOL_ERROR)
            return self._stream_error(sid, f.PROTOCOL_ERROR)  # RFC 9113 5.3.1
        self._spend_control()  # otherwise dropped: deprecated, the relay does not prioritize
        return None

    def _client_goaway(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if sid or len(payload) < 8:
            return self._fail("client", f.PROTOCOL_ERROR, "malformed GOAWAY")
        self._to_server.append(raw)
        self._events.append(
            GoawayReceived(
                "client",
                int.from_bytes(payload[:4], "big") & 0x7FFFFFFF,
                int.from_bytes(payload[4:8], "big"),
            )
        )
        return None

    def _client_push_promise(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        return self._fail("client", f.PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _client_window_update(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
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
                self._to_server.append(raw)
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
        stream.window += increment
        if stream.window > f.MAX_WINDOW:
            return self._reset_both(sid, stream, f.FLOW_CONTROL_ERROR)  # RFC 9113 6.9.1
        if stream.state in FORWARDED:
            self._to_server.append(raw)
        elif stream.body:
            self._send_local_body(sid, stream)
        return None

    def _client_rst(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if len(payload) != 4:
            return self._fail("client", f.FRAME_SIZE_ERROR, "RST_STREAM length")
        if not sid or sid > self._max_client_sid:
            return self._fail("client", f.PROTOCOL_ERROR, "RST_STREAM on an idle stream")
        stream = self._streams.get(sid)
        if stream is None:
            return None
        code = int.from_bytes(payload, "big")
        self._events.append(StreamEnded(sid, stream.status, reset_code=code, reset_by="client"))
        if stream.state in FORWARDED:
            self._to_server.append(raw)
            if stream.state in SERVER_SENDING and not stream.status:
                self._spend_reset()
        self._advance(sid, stream, CLIENT_RESET)
        return None

    def _client_settings_frame(self, flags: int, sid: int, payload: bytes, raw: bytes) -> None:
        if sid:
            return self._fail("client", f.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.FLAG_ACK:
            if payload:
                return self._fail("client", f.FRAME_SIZE_ERROR, "SETTINGS ACK with payload")
            if self._unacked_limits:
                self._client_acked_limits()
            self._to_server.append(raw)
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
                if not self._change_initial_window(value):
                    return b""
            elif key == f.SETTINGS_MAX_FRAME_SIZE:
                value = f.capped_max_frame_size(value, lim.max_frame_size)
                if not value:
                    self._fail("client", f.PROTOCOL_ERROR, "MAX_FRAME_SIZE value")
                    return b""
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

    def _change_initial_window(self, value: int) -> bool:
        """SETTINGS_INITIAL_WINDOW_SIZE changes every stream's window by the difference
        (RFC 9113 6.9.2); one pushed above 2^31-1 is a connection FLOW_CONTROL_ERROR."""
        delta = value - self._client_initial_window
        self._client_initial_window = value
        for stream in self._streams.values():
            stream.window += delta
            if stream.window > f.MAX_WINDOW:
                self._fail("client", f.FLOW_CONTROL_ERROR, "stream window overflow")
                return False
        for waiting in sorted(self._waiting_bodies):
            self._send_local_body(waiting, self._streams[waiting])
        return True
