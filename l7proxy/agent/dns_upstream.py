"""The DNS proxy's UDP connections to DNS servers: one connected, marked socket per (server,
source identity), shared by every query in flight to it.

Queries of different pods may carry the same id, so each query leaves with an id the proxy picks
(free among those in flight on that socket) and its answer is matched by that id and given the
client's id back. A socket per query cost a socket(), a setsockopt, a connect and a close, and
three trips through the event loop's reader registration, for every query.
"""

from __future__ import annotations

import asyncio
import socket
from collections import OrderedDict

from l7proxy.platform import proxy_mark, set_mark

MAX_UPSTREAMS = 256  # (server, identity) pairs kept open; the least recently used is closed


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.transport = None
        self.pending: dict[int, asyncio.Future] = {}
        self.next_id = 1

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) < 2:
            return
        future = self.pending.get(int.from_bytes(data[:2], "big"))
        if future is not None and not future.done():
            future.set_result(data)

    def error_received(self, exc) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(exc)

    def connection_lost(self, exc) -> None:
        self.error_received(exc or ConnectionError("the upstream socket closed"))

    def _free_id(self) -> int:
        if len(self.pending) >= 0xFFFF:
            raise OSError("65,535 queries in flight to one server")
        while self.next_id in self.pending:
            self.next_id = self.next_id % 0xFFFF + 1
        ident = self.next_id
        self.next_id = ident % 0xFFFF + 1
        return ident

    async def ask(self, wire: bytes, timeout: float) -> bytes:
        ident = self._free_id()
        future = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        try:
            self.transport.sendto(ident.to_bytes(2, "big") + wire[2:])
            async with asyncio.timeout(timeout):
                answer = await future
        finally:
            del self.pending[ident]
        return wire[:2] + answer[2:]


class UdpUpstreams:
    def __init__(self) -> None:
        # (server, identity) -> the task opening its upstream (done once open): queries that
        # arrive while it opens wait for the same socket
        self._by_key: OrderedDict[tuple, asyncio.Task] = OrderedDict()

    async def ask(self, wire: bytes, server: tuple[str, int], src_id: int, timeout: float) -> bytes:
        key = (server, src_id)
        opening = self._by_key.get(key)
        if opening is not None and opening.done() and _broken(opening):
            opening = None
        if opening is None:
            opening = self._by_key[key] = asyncio.ensure_future(self._open(server, src_id))
            if len(self._by_key) > MAX_UPSTREAMS:
                _close(self._by_key.popitem(last=False)[1])
        else:
            self._by_key.move_to_end(key)
        upstream = await opening
        return await upstream.ask(wire, timeout)

    async def _open(self, server: tuple[str, int], src_id: int) -> _Upstream:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            set_mark(sock, proxy_mark(src_id))  # the server's ingress sees the pod's identity
            sock.setblocking(False)
            sock.connect(server)  # UDP: no packet; replies from elsewhere are filtered out
        except OSError:
            sock.close()
            raise
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_datagram_endpoint(_Upstream, sock=sock)
        return upstream

    def close(self) -> None:
        for opening in self._by_key.values():
            _close(opening)
        self._by_key.clear()


def _broken(opening: asyncio.Task) -> bool:
    if opening.cancelled() or opening.exception() is not None:
        return True
    transport = opening.result().transport
    return transport is None or transport.is_closing()


def _close(opening: asyncio.Task) -> None:
    if not opening.done():
        opening.cancel()
    elif not _broken(opening):
        opening.result().transport.close()
