"""The DNS proxy's UDP connections to DNS servers: one connected, marked socket per (server,
source identity), shared by every query in flight to it.

Queries of different pods may carry the same id, so each query leaves with an id the proxy picks
(free among those in flight on that socket) and its answer is matched by that id and given the
client's id back. A socket per query cost a socket(), a setsockopt, a connect and a close, and
three trips through the event loop's reader registration, for every query.

Callbacks, not a task per query: `send()` registers the query and returns at once, and the
socket's reader calls `on_answer(wire, None)` with the answer (or `on_answer(None, error)` when
the server did not answer in time or the socket failed). Timeouts are found by one sweep timer
per socket that looks only at the oldest queries (every query on a socket has the same timeout,
so they expire in the order they were sent). A coroutine, a task, a future and a timer per
query cost more CPU than reading and relaying the message (issue 21's profile).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import OrderedDict
from collections.abc import Callable

from l7proxy.platform import family_of, proxy_mark, set_mark

MAX_UPSTREAMS = 256  # (server, identity) pairs kept open; the least recently used is closed
MAX_ANSWERS_PER_WAKEUP = 64
SWEEP_INTERVAL = 0.1  # seconds: how late a timeout may be noticed

OnAnswer = Callable[[bytes | None, Exception | None], None]


class _Upstream:
    """One connected UDP socket to one server, for one source identity."""

    def __init__(self, loop, server: tuple[str, int], src_id: int, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.sock = socket.socket(family_of(server[0]), socket.SOCK_DGRAM)
        try:
            set_mark(self.sock, proxy_mark(src_id))  # the server's ingress sees the pod's identity
            self.sock.setblocking(False)
            self.sock.connect(server)  # UDP: no packet; replies from elsewhere are filtered out
        except OSError:
            self.sock.close()
            raise
        # query id on the wire -> (deadline, the client's id, callback); insertion order is
        # deadline order
        self.pending: dict[int, tuple[float, bytes, OnAnswer]] = {}
        self.next_id = 1
        self.closed = False
        self._sweep: asyncio.TimerHandle | None = None
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def _free_id(self) -> int:
        if len(self.pending) >= 0xFFFF:
            raise OSError("65,535 queries in flight to one server")
        while self.next_id in self.pending:
            self.next_id = self.next_id % 0xFFFF + 1
        ident = self.next_id
        self.next_id = ident % 0xFFFF + 1
        return ident

    def send(self, wire: bytes, on_answer: OnAnswer) -> None:
        ident = self._free_id()
        self.sock.send(ident.to_bytes(2, "big") + wire[2:])  # raises OSError: caller's error
        self.pending[ident] = (time.monotonic() + self.timeout, wire[:2], on_answer)
        if self._sweep is None:
            self._sweep = self.loop.call_later(SWEEP_INTERVAL, self._expire)

    def _on_readable(self) -> None:
        for _ in range(MAX_ANSWERS_PER_WAKEUP):
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. ICMP port unreachable on a connected socket
                self._fail_all(exc)
                return
            if len(data) < 2:
                continue
            waiting = self.pending.pop(int.from_bytes(data[:2], "big"), None)
            if waiting is not None:
                _, client_id, on_answer = waiting
                on_answer(client_id + data[2:], None)

    def _expire(self) -> None:
        self._sweep = None
        now = time.monotonic()
        while self.pending:
            ident, (deadline, _, on_answer) = next(iter(self.pending.items()))
            if deadline > now:
                break
            del self.pending[ident]
            on_answer(None, TimeoutError())
        if self.pending and not self.closed:
            self._sweep = self.loop.call_later(SWEEP_INTERVAL, self._expire)

    def _fail_all(self, exc: Exception) -> None:
        waiting, self.pending = self.pending, {}
        for _, _, on_answer in waiting.values():
            on_answer(None, exc)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._fail_all(ConnectionError("the upstream socket closed"))


class UdpUpstreams:
    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._by_key: OrderedDict[tuple, _Upstream] = OrderedDict()

    def send(self, wire: bytes, server: tuple[str, int], src_id: int, on_answer: OnAnswer) -> None:
        """Forward one query; `on_answer` is called exactly once, later (never from inside
        this call). OSError when no socket could be opened or the send failed."""
        key = (server, src_id)
        upstream = self._by_key.get(key)
        if upstream is None or upstream.closed:
            upstream = _Upstream(asyncio.get_running_loop(), server, src_id, self.timeout)
            self._by_key[key] = upstream
            if len(self._by_key) > MAX_UPSTREAMS:
                self._by_key.popitem(last=False)[1].close()
        else:
            self._by_key.move_to_end(key)
        upstream.send(wire, on_answer)

    async def ask(self, wire: bytes, server: tuple[str, int], src_id: int) -> bytes:
        """`send` for a caller that wants to await the answer."""
        future = asyncio.get_running_loop().create_future()

        def done(answer: bytes | None, exc: Exception | None) -> None:
            if not future.done():
                future.set_exception(exc) if exc is not None else future.set_result(answer)

        self.send(wire, server, src_id, done)
        return await future

    def close(self) -> None:
        for upstream in self._by_key.values():
            upstream.close()
        self._by_key.clear()
