"""The proxy's one log line format: `l7proxy[PID]: message` on stderr, flushed at once (several
workers write to the same stream, and a line must not wait in a buffer while a worker hangs)."""

from __future__ import annotations

import os
import sys


def log(msg: str) -> None:
    print(f"l7proxy[{os.getpid()}]: {msg}", file=sys.stderr, flush=True)
