"""The demo's children: started in their own process group, stopped as a group, waited for.

Every program the demo starts is a real command: the `l7proxy` CLI, noida-db, curl, or a module
of this package run as `python -m demo.<module>` (the deathstar, the door manager, the clients),
inside an endpoint's namespace with `ip netns exec` in node mode.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator


def module(name: str, *args: str) -> list[str]:
    """argv that runs demo.NAME with this interpreter."""
    return [sys.executable, "-m", f"demo.{name}", *args]


def shown(argv: list[str]) -> list[str]:
    """argv as the demo prints it: `l7proxy` for `python -m l7proxy` (as a user types it), and
    `python` instead of the venv's full interpreter path."""
    out: list[str] = []
    for a in argv:
        if out[-2:] == ["python", "-m"] and a == "l7proxy":
            out[-2:] = ["l7proxy"]
        else:
            out.append("python" if a == sys.executable else a)
    return out


def in_ns(netns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv]


def start_group(argv: list[str], **kw) -> subprocess.Popen:
    """A child in its own process group, so `stop` reaches whatever it starts in turn."""
    return subprocess.Popen(argv, start_new_session=True, **kw)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left of it after `timeout`."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group looks alive while it is a zombie
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


class Children:
    """What one run started (processes) or must undo (callbacks), undone last-first by close()."""

    def __init__(self) -> None:
        self._undo: list[subprocess.Popen | Callable[[], object]] = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        with deferred_interrupts() as held:
            proc = start_group(argv, **kw)
            self._undo.append(proc)
        if held:
            raise KeyboardInterrupt
        return proc

    def start_server(self, argv: list[str]) -> subprocess.Popen:
        """A server of this package: it prints `listening` once it accepts connections."""
        proc = self.start(argv, stdout=subprocess.PIPE, text=True)
        if proc.stdout.readline().strip() != "listening":
            raise RuntimeError(f"`{shlex.join(shown(argv))}` did not start")
        return proc

    def defer(self, callback: Callable[[], object]) -> None:
        self._undo.append(callback)

    def forget(self) -> None:
        """--keep: leave everything running."""
        self._undo.clear()

    def close(self) -> None:
        with uninterrupted():
            while self._undo:
                item = self._undo.pop()  # e.g. the broker before its data directory
                with contextlib.suppress(Exception):
                    stop(item) if isinstance(item, subprocess.Popen) else item()


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[list[int]]:
    """Ctrl-C or SIGTERM while a child is being started is held back until the `with` ends (the
    list then holds it; the caller raises KeyboardInterrupt): raised inside Popen, it would leave
    a child running that nobody has a handle on."""
    held: list[int] = []
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def hold(signum, frame) -> None:
        if old[signum] is not signal.SIG_IGN:  # inside `uninterrupted` it stays ignored
            held.append(signum)

    for sig in old:
        signal.signal(sig, hold)
    try:
        yield held
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def uninterrupted():
    """Cleanup must finish: a second Ctrl-C or SIGTERM during it would leave namespaces behind."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def wait_port(host: str, port: int, source: str | None = None, timeout: float = 20.0) -> None:
    """Until something accepts on host:port (connecting from `source` when given)."""
    deadline = time.monotonic() + timeout
    bind = (source, 0) if source else None
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((host, port), timeout=0.5, source_address=bind),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")
