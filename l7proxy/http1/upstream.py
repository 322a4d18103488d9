"""Upstream HTTP/1 connections and the per-worker keep-alive pool.

An `UpstreamConn` belongs to at most one client session at a time (`attach`). Its bytes go to the
session unchanged; its `ResponseParser` only finds where each response ends, so the session knows
when the next pipelined request may go and when the connection may return to the pool.
"""

from __future__ import annotations

import asyncio
from collections import deque

from l7proxy.session import PauseReason
from parsers.http1 import ResponseEnd, ResponseParser, Upgrade


class UpstreamConn(asyncio.Protocol):
    __slots__ = (
        "transport",
        "parser",
        "session",
        "dest",
        "closed",
        "reused",
        "tunnel",
        "got_bytes",
        "in_head",
        "held",
        "max_head",
        "body_left",
    )

    def __init__(self, dest) -> None:
        self.dest = dest
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.session = None
        self.closed = False
        self.reused = False
        self.tunnel = False
        self.got_bytes = False  # of the response in flight (forwarded to the client)
        # The response head is held until it is complete (then forwarded with what follows),
        # so one larger than `max_head` is answered 502 instead of reaching the client.
        self.in_head = False
        self.held = b""
        self.max_head = 0  # max_response_header_bytes, set by the session with each request
        # Body bytes of the response in flight still to come, while it waits for the client's
        # write buffer to empty before the rest is spliced (l7proxy/http1/bodies.py).
        self.body_left = 0

    # -- asyncio --
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # An exception closes this transport (the loop does it); connection_lost then tells the
        # session, which answers 503 or closes its client.
        session = self.session
        if session is None:  # an idle pooled connection must stay silent
            self.close()
            return
        head_end = -1
        if self.in_head:
            # The common case in one look: a whole final head (not 1xx) within the limit.
            end = -1 if self.held else data.find(b"\r\n\r\n")
            if 9 < end <= self.max_head - 4 and data[9] != 49:  # 49: b"1"
                self.in_head = False
                head_end = end
            else:
                data = self._through_head(data)
                if not data:
                    return
        session.transport.write(data)
        if self.tunnel:
            return
        self.got_bytes = True
        events = self.parser.receive_data(data, head_end)
        for event in events:
            cls = event.__class__
            if cls is ResponseEnd:
                session.on_response_end(event)
            elif cls is Upgrade:
                self.tunnel = True
                session.on_tunnel()
        if self.parser.error is not None and not self.closed:
            session.on_upstream_lost(self, "invalid")
        elif not events:
            if head_end >= 0 or self.body_left:
                # A body that goes on after this read: the rest may be spliced.
                session.splice_response_body(self, data, head_end)
        elif self.body_left:
            self.body_left = 0

    def _through_head(self, data: bytes) -> bytes:
        """What may go to the client now: nothing while the head is incomplete, complete 1xx
        heads at once (a client waiting for 100-continue must see it), everything once the
        final head is complete. A head above `max_head` tells the session instead."""
        held = self.held
        buf = held + data if held else data
        limit = self.max_head
        pos = 0  # where the head being looked at starts in buf
        scan = max(0, len(held) - 3)
        while True:
            end = buf.find(b"\r\n\r\n", scan)
            if end < 0:
                if len(buf) - pos > limit:
                    break
                self.held = buf[pos:]
                return buf[:pos]
            if end + 4 - pos > limit:
                break
            code = buf[pos + 9 : pos + 12]
            if code[:1] == b"1" and code != b"101":
                pos = scan = end + 4  # an interim response: the final head follows
                continue
            self.in_head = False
            self.held = b""
            return buf
        self.in_head = False
        self.held = b""
        self.session.on_response_head_too_large(self)
        return b""

    def eof_received(self):
        return False  # close our side too

    def connection_lost(self, exc) -> None:
        self.closed = True
        session = self.session
        if session is not None:
            session.on_upstream_lost(self, "reset" if exc else "closed")

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_client_reading(PauseReason.UPSTREAM_FULL)

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_client_reading(PauseReason.UPSTREAM_FULL)

    # -- for the session --
    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.session = None
            if self.transport is not None:
                self.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per destination (bounded), reused newest first."""

    def __init__(self, max_idle: int, connect_timeout: float) -> None:
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self._idle: dict[object, deque[UpstreamConn]] = {}

    def acquire(self, dest) -> UpstreamConn | None:
        idle = self._idle.get(dest)
        while idle:
            conn = idle.pop()
            if not conn.closed and not conn.transport.is_closing():
                conn.reused = True
                return conn
        return None

    def release(self, conn: UpstreamConn) -> None:
        conn.session = None
        if conn.closed or conn.tunnel or conn.parser.error is not None:
            conn.close()
            return
        idle = self._idle.setdefault(conn.dest, deque())
        if len(idle) >= self.max_idle:
            conn.close()
            return
        conn.got_bytes = False
        idle.append(conn)

    async def connect(self, dest, high: int, low: int) -> UpstreamConn:
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConn(dest), dest.host, dest.port),
            self.connect_timeout,
        )
        conn.transport.set_write_buffer_limits(high, low)
        return conn

    def idle_count(self) -> int:
        return sum(len(q) for q in self._idle.values())

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
