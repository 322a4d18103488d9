"""The agent's event loop: uvloop, plus SO_MARK on upstream connections that ask for it.

The proxy sessions open upstreams with `loop.create_connection(factory, dest.host, dest.port)`.
In the transparent modes the agent's destinations carry their host as a `MarkedHost` (a str with
the mark the datapath reads the source identity from), and this loop creates the socket, sets
SO_MARK before connect(), and hands the connected socket on. Every protocol (HTTP/1, HTTP/2,
Kafka) gets the mark without knowing about it; anything else connects as usual.
"""

from __future__ import annotations

import asyncio
import errno
import socket

from l7proxy.platform import family_of, set_mark, set_transparent

try:
    import uvloop

    _Base = uvloop.Loop
except ImportError:  # pragma: no cover - uvloop is a dependency
    _Base = asyncio.SelectorEventLoop


class MarkedHost(str):
    """An upstream host name that also carries the SO_MARK for the connection, and the source
    address to connect from (cluster native routing keeps the client pod's address)."""

    mark: int
    source: str

    def __new__(cls, value: str, mark: int, source: str = "") -> MarkedHost:
        obj = super().__new__(cls, value)
        obj.mark = mark
        obj.source = source
        return obj


class MarkingLoop(_Base):
    async def create_connection(self, protocol_factory, host=None, port=None, **kw):
        mark = getattr(host, "mark", 0)
        if not mark or kw.get("sock") is not None:
            return await super().create_connection(protocol_factory, host, port, **kw)
        sock = socket.socket(family_of(str(host)), socket.SOCK_STREAM)
        try:
            set_mark(sock, mark)
            if getattr(host, "source", ""):
                set_transparent(sock)  # bind to an address this namespace does not hold
                sock.bind((host.source, 0))
            sock.setblocking(False)
            await connect_numeric(self, sock, str(host), port)
        except BaseException:
            sock.close()
            raise
        for unused in ("family", "proto", "flags", "local_addr"):
            kw.pop(unused, None)
        return await super().create_connection(protocol_factory, sock=sock, **kw)


async def connect_numeric(loop, sock: socket.socket, host: str, port: int) -> None:
    """connect() a non-blocking socket to an address literal. uvloop's sock_connect resolves
    even a literal through getaddrinfo on its thread pool: a round trip through another thread
    and about 100 us of CPU per upstream connection, for nothing. A name goes that way still."""
    try:
        socket.inet_pton(sock.family, host)
    except (OSError, ValueError):
        await loop.sock_connect(sock, (host, port))
        return
    err = sock.connect_ex((host, port))
    if err == errno.EINPROGRESS:
        done = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, lambda: done.done() or done.set_result(None))
        try:
            await done
        finally:
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"connect to {host} port {port}: {errno.errorcode.get(err, err)}")


def new_event_loop() -> asyncio.AbstractEventLoop:
    return MarkingLoop()
