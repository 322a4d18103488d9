"""The agent's event loop: a marked upstream connects straight to its address literal (no
getaddrinfo round trip through uvloop's thread pool), over either family, with its SO_MARK."""

from __future__ import annotations

import asyncio
import socket

import pytest

from l7proxy.agent.loop import MarkedHost, MarkingLoop

pytestmark = pytest.mark.root  # SO_MARK needs CAP_NET_ADMIN


class Recording(MarkingLoop):
    def __init__(self) -> None:
        super().__init__()
        self.resolved: list[tuple] = []

    async def getaddrinfo(self, host, port, **kw):
        self.resolved.append((host, port))
        return await super().getaddrinfo(host, port, **kw)


def _run(main):
    loop = Recording()
    try:
        return loop, loop.run_until_complete(main(loop))
    finally:
        loop.close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_a_marked_upstream_connects_to_a_literal_without_resolving(host):
    async def main(loop):
        server = await loop.create_server(asyncio.Protocol, host, 0)
        port = server.sockets[0].getsockname()[1]
        try:
            transport, _ = await loop.create_connection(
                asyncio.Protocol, MarkedHost(host, 0xB00 | 42), port
            )
            sock = transport.get_extra_info("socket")
            mark = sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)
            peer = transport.get_extra_info("peername")[:2]
            transport.close()
            return mark, peer
        finally:
            server.close()

    loop, (mark, peer) = _run(main)
    assert mark == 0xB00 | 42
    assert peer[0] == host
    assert loop.resolved == []


def test_a_refused_marked_upstream_raises_connection_refused():
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]  # bound, never listening: the connect is refused

    async def main(loop):
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(asyncio.Protocol, MarkedHost("127.0.0.1", 0xB00), port)

    try:
        _run(main)
    finally:
        probe.close()


def test_a_marked_host_that_is_a_name_is_still_resolved():
    async def main(loop):
        server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            transport, _ = await loop.create_connection(
                asyncio.Protocol, MarkedHost("localhost", 0xB00), port
            )
            transport.close()
        finally:
            server.close()

    loop, _ = _run(main)
    assert loop.resolved and loop.resolved[0][0] == "localhost"
