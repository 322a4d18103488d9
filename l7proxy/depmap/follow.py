"""Feed a map from a flow log that is still being written (`l7proxy map --serve --flow-log F`)."""

from __future__ import annotations

import asyncio
import json
import os

POLL_INTERVAL = 0.2
MAX_LINE = 1 << 20  # a longer "line" is not a flow; drop it rather than buffer without end


async def follow(path: str, feed, poll: float = POLL_INTERVAL, from_start: bool = True) -> None:
    """Read JSON lines from `path` as they are appended, calling feed(flow) for each flow.

    Polls (no inotify dependency); a partial last line waits for its newline. A truncated or
    rotated file is read again from its start.
    """
    offset = 0
    inode = None
    pending = b""
    first = True
    while True:
        try:
            with open(path, "rb") as fh:
                fh.seek(0, 2)
                size = fh.tell()
                if first and not from_start:
                    offset = size
                ino = os.fstat(fh.fileno()).st_ino
                if size < offset or (inode is not None and ino != inode):  # truncated or rotated
                    offset, pending = 0, b""
                inode = ino
                fh.seek(offset)
                chunk = fh.read(size - offset)
                offset = size
        except FileNotFoundError:
            chunk = b""
        first = False
        if chunk:
            pending += chunk
            *lines, pending = pending.split(b"\n")
            if len(pending) > MAX_LINE:
                pending = b""
            for line in lines:
                flow = parse_line(line)
                if flow is not None:
                    feed(flow)
        await asyncio.sleep(poll)


def parse_line(line: bytes) -> dict | None:
    line = line.strip()
    if not line:
        return None
    try:
        flow = json.loads(line)
    except ValueError:
        return None
    if isinstance(flow, dict) and isinstance(flow.get("flow"), dict):
        flow = flow["flow"]  # `hubble observe -o json` wraps each flow
    return flow if isinstance(flow, dict) else None
