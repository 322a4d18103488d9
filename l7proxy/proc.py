"""Stopping processes by pid, in one place: SIGTERM, a grace period, then SIGKILL. A zombie counts
as stopped (it has exited; only its parent can reap it)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path


def running(pid: int) -> bool:
    """True while `pid` exists and has not exited (a zombie has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM every pid, wait up to `timeout` for all to exit, SIGKILL the rest."""
    pids = list(pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if running(pid)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
