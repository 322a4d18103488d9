"""The splice(2) pump: a message body that is already judged moves from one socket (the source)
to another (the sink) through a pipe, in the kernel, while the source's transport is paused.

Used by Kafka for large Produce bodies, client -> broker (docs/kafka.md, "splice(2) for large
Produce bodies"), and by HTTP/1 for large Content-Length bodies both ways, client -> upstream and
upstream -> client (docs/proxy-core.md, "Bodies through splice(2)"). The session decides when to
splice, how many bytes, and what comes after; this module only moves bytes and watches the two
sockets.
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
    """What the splicer needs from the session (or the side of it) that owns it."""

    def splice_bytes_left(self) -> int:
        """Bytes of the message being spliced that the source has not sent yet (0: done)."""

    def spliced(self, n: int) -> None:
        """`n` bytes went from the source socket into the pipe."""

    def splice_ready(self) -> None:
        """A watched socket is ready: pump again."""

    def source_eof_in_message(self) -> None:
        """The source closed before the message was through."""

    def splice_failed(self, exc: OSError) -> None:
        """splice(2) failed; the session closes."""


class Splicer:
    """Pumps one direction of one connection: source socket -> pipe -> sink socket. The
    watchers sit on dup()s of the sockets, as the event loop refuses a second watcher on a
    transport's own descriptor. The watcher on the source socket stays registered from wait to
    wait and message to message (each add and remove costs a poll handle, an ioctl and
    epoll_ctl calls); it goes only for a wait on the sink side and when reading goes back to the
    transport.

    The dup()s keep the sockets open: whoever closes a transport whose socket a splicer holds
    must close the splicer too (`close`), or the peer never sees the close."""

    __slots__ = (
        "owner", "loop", "src", "dst", "pr", "pw", "pipe_size", "in_pipe", "reading", "writing",
        "closed",
    )  # fmt: skip

    def __init__(self, owner: SpliceOwner, source_fd: int, sink_fd: int) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.src = os.dup(source_fd)
        try:
            self.dst = os.dup(sink_fd)
        except OSError:
            os.close(self.src)
            raise
        try:
            self.pr, self.pw = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            os.close(self.src)
            os.close(self.dst)
            raise
        try:
            self.pipe_size = fcntl.fcntl(self.pw, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            self.pipe_size = 64 * 1024  # the default pipe works, in more calls
        self.in_pipe = 0
        self.reading = self.writing = False
        self.closed = False

    def pump(self) -> bool:
        """Move what can move now. True when the message is through (or the session closed).
        A short splice means the socket had no more bytes (or room) for now: the splicer waits
        then instead of calling again into EAGAIN, a BlockingIOError per call. (A short count
        with bytes left is only a wake-up more: the watchers are level-triggered.)"""
        owner = self.owner
        if self.writing:
            self._stop_writing()
        drained = False
        try:
            while True:
                if self.in_pipe:
                    try:
                        n = os.splice(self.pr, self.dst, self.in_pipe, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        n = 0
                    self.in_pipe -= n
                    if self.in_pipe:  # the sink socket's buffer is full
                        self._watch_sink()
                        return False
                left = owner.splice_bytes_left()
                if not left:
                    return True
                if drained:
                    self.wait_for_source()
                    return False
                want = min(left, self.pipe_size)  # the pipe is empty here
                try:
                    n = os.splice(self.src, self.pw, want, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self.wait_for_source()
                    return False
                if n == 0:
                    owner.source_eof_in_message()
                    return True
                drained = n < want
                owner.spliced(n)
                self.in_pipe += n
        except OSError as exc:
            owner.splice_failed(exc)
            return True

    def read_head(self, size: int) -> bytes | None:
        """Read up to `size` bytes of the next message from the source socket; None when
        nothing is there yet (the caller waits with `wait_for_source`). Raises OSError."""
        try:
            return os.read(self.src, size)
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

    def wait_for_source(self) -> None:
        """Call back when the source socket is readable (the watcher may be there already)."""
        if not self.reading:
            self.loop.add_reader(self.src, self.owner.splice_ready)
            self.reading = True

    def _watch_sink(self) -> None:
        """Call back when the sink socket takes more. The source watcher goes meanwhile: with
        bytes waiting on the source socket it would fire on every loop turn."""
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False
        self.loop.add_writer(self.dst, self.owner.splice_ready)
        self.writing = True

    def unwatch(self) -> None:
        """Drop the watchers (reading goes back to the transport, or the splicer closes)."""
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False
        if self.writing:
            self._stop_writing()

    def _stop_writing(self) -> None:
        self.loop.remove_writer(self.dst)
        self.writing = False

    def drop_sink(self) -> None:
        """Let go of the sink socket between messages (the pipe is empty): the splicer's dup()
        must not keep a connection open that its owner closes or hands on meanwhile."""
        if self.writing:
            self._stop_writing()
        if self.dst >= 0:
            os.close(self.dst)
            self.dst = -1

    def set_sink(self, sink_fd: int) -> None:
        """The sink for the next message (after `drop_sink`). Raises OSError (out of fds)."""
        self.dst = os.dup(sink_fd)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.unwatch()
        for fd in (self.src, self.dst, self.pr, self.pw):
            if fd >= 0:
                os.close(fd)
