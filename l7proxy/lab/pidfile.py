"""Processes the lab started, by pidfile: the pid and its start time (so a pid the kernel gave to
another process since is never signalled)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

from l7proxy import proc


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def write(path: Path, pid: int) -> None:
    path.write_text(f"{pid} {start_time(pid) or ''}\n")


def alive(path: Path) -> int | None:
    """The recorded pid if that same process still runs."""
    try:
        pid_text, _, started = path.read_text().strip().partition(" ")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    if not proc.running(pid) or start_time(pid) != started:
        return None
    return pid


def stop(path: Path, *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Signal the recorded process and wait for it (SIGKILL after `timeout`); True if it ran."""
    pid = alive(path)
    if pid is None:
        with contextlib.suppress(OSError):
            path.unlink()
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while alive(path) is not None:
        _reap(pid)
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
        time.sleep(0.05)
    with contextlib.suppress(OSError):
        path.unlink()
    return True


def _reap(pid: int) -> None:
    """A child of this process (lab node start from a test) would stay a zombie otherwise."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
