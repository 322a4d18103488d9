"""The splice(2) pump: the body of a large, already allowed Produce moves from the client socket
to the broker socket through a pipe, in the kernel, while the client transport is paused.

Why and what it measured: docs/kafka.md ("splice(2) for large Produce bodies"). The session
(session.py) decides when to splice and what to do with the next request's head; this module
only moves bytes and watches the two sockets.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from typing import Protocol

_PIPE_SIZE = 1024 * 1024
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_ATOMIC = 4096  # PIPE_BUF: a write this small into an empty pipe is whole

AVAILABLE = hasattr(os, "splice")


class SpliceOwner(Protocol):
    """What the splicer needs from the session that owns it."""

    def request_bytes_left(self) -> int:
        """Bytes of the request being spliced that the client has not sent yet (0: done)."""

    def spliced(self, n: int) -> None:
        """`n` request bytes went from the client socket into the pipe."""

    def splice_ready(self) -> None:
        """A watched socket is ready: pump again."""

    def client_eof_in_request(self) -> None:
        """The client closed before the request was through."""

    def splice_failed(self, exc: OSError) -> None:
        """splice(2) failed; the session closes."""


class Splicer:
    """Pumps one connection's spliced request bodies. The watchers sit on dup()s of the
    sockets, as the event loop refuses a second watcher on a transport's own descriptor. The
    watcher on the client socket stays registered from wait to wait and request to request
    (each add and remove costs a poll handle, an ioctl and epoll_ctl calls); it goes only for a
    wait on the broker side and when reading goes back to the transport."""

    __slots__ = (
        "owner", "loop", "cfd", "ufd", "pr", "pw", "pipe_size", "in_pipe", "reading", "writing",
    )  # fmt: skip

    def __init__(self, owner: SpliceOwner, client_fd: int, upstream_fd: int) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.cfd = os.dup(client_fd)
        self.ufd = os.dup(upstream_fd)
        self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.pipe_size = fcntl.fcntl(self.pw, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            self.pipe_size = 64 * 1024  # the default pipe works, in more calls
        self.in_pipe = 0
        self.reading = self.writing = False

    def pump(self) -> bool:
        """Move what can move now. True when the request is through (or the session closed).
        A short splice means the socket had no more bytes (or room) for now: the splicer waits
        then instead of calling again into EAGAIN, a BlockingIOError per call. (A short count
        with bytes left is only a wake-up more: the watchers are level-triggered.)"""
        owner = self.owner
        if self.writing:
            self.loop.remove_writer(self.ufd)
            self.writing = False
        drained = False
        try:
            while True:
                if self.in_pipe:
                    try:
                        n = os.splice(self.pr, self.ufd, self.in_pipe, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = 0
                    self.in_pipe -= n
                    if self.in_pipe:  # the broker socket's buffer is full
                        self._watch_broker()
                        return False
                left = owner.request_bytes_left()
                if not left:
                    return True
                if drained:
                    self.wait_for_client()
                    return False
                want = min(left, self.pipe_size)  # the pipe is empty here
                try:
                    n = os.splice(self.cfd, self.pw, want, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self.wait_for_client()
                    return False
                if n == 0:
                    owner.client_eof_in_request()
                    return True
                drained = n < want
                owner.spliced(n)
                self.in_pipe += n
        except OSError as exc:
            owner.splice_failed(exc)
            return True

    def read_head(self, size: int) -> bytes | None:
        """Read up to `size` bytes of the next request from the client socket; None when
        nothing is there yet (the caller waits with `wait_for_client`). Raises OSError."""
        try:
            return os.read(self.cfd, size)
        except BlockingIOError:
            return None

    def put(self, data: bytes) -> bool:
        """Queue `data` in the (empty) pipe ahead of the body to come. False when it does not
        fit at once (the caller writes it through the transport instead)."""
        if self.in_pipe or len(data) > _PIPE_ATOMIC:
            return False
        try:
            n = os.write(self.pw, data)
        except OSError:
            return False
        self.in_pipe += n
        return True

    def wait_for_client(self) -> None:
        """Call back when the client socket is readable (the watcher may be there already)."""
        if not self.reading:
            self.loop.add_reader(self.cfd, self.owner.splice_ready)
            self.reading = True

    def _watch_broker(self) -> None:
        """Call back when the broker socket takes more. The client watcher goes meanwhile: with
        bytes waiting on the client socket it would fire on every loop turn."""
        if self.reading:
            self.loop.remove_reader(self.cfd)
            self.reading = False
        self.loop.add_writer(self.ufd, self.owner.splice_ready)
        self.writing = True

    def unwatch(self) -> None:
        """Drop the watchers (reading goes back to the transport, or the splicer closes)."""
        if self.reading:
            self.loop.remove_reader(self.cfd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.ufd)
            self.writing = False

    def close(self) -> None:
        self.unwatch()
        for fd in (self.cfd, self.ufd, self.pr, self.pw):
            os.close(fd)
