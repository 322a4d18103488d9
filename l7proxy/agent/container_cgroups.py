"""Finding a container's cgroup once its runtime makes it (sidecar mode for CNI containers).

The sidecar's connect() hooks key an endpoint by the cgroup its processes run in, but at CNI ADD
the container's cgroup does not exist yet: podman sets up the network first, then `runc create`
makes the cgroup (`<cgroup v2 root>/libpod_parent/libpod-<id>` with podman's cgroupfs manager,
`machine.slice/libpod-<id>.scope` with systemd's) and starts the container's first process about
70-110 ms later (measured here over 5 runs). So ADD registers the endpoint with its cgroup
pending, and this watcher waits for the directory with inotify on the parents (IN_CREATE), which
reacts within milliseconds, and hands the path over. A parent that does not exist yet (podman
makes `libpod_parent` with its first container) is watched for on the root. A rescan every
`rescan_interval` seconds catches what a missed event (queue overflow) would lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("l7proxy.agent")

IN_CREATE = 0x00000100
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then the name

# How runtimes name a container's cgroup (podman cgroupfs/systemd, CRI-O, containerd, docker).
CGROUP_NAMES = (
    "libpod-{id}",
    "libpod-{id}.scope",
    "crio-{id}.scope",
    "cri-containerd-{id}.scope",
    "docker-{id}.scope",
)
DEFAULT_PARENTS = ("libpod_parent", "machine.slice", "system.slice")


def cgroup_names(container_id: str) -> list[str]:
    return [pattern.format(id=container_id) for pattern in CGROUP_NAMES]


def populated(cgroup: Path) -> bool:
    """cgroup v2's `cgroup.events` says whether any process is in it (or below); a directory
    without that file (not a cgroup v2 one) counts as populated."""
    try:
        events = (cgroup / "cgroup.events").read_text()
    except OSError:
        return True
    return "populated 0" not in events


class CgroupWatcher:
    """container id -> callback(path), called once when the container's cgroup exists."""

    def __init__(self, root: Path, parents=DEFAULT_PARENTS, rescan_interval: float = 1.0) -> None:
        self.root = Path(root)
        self.parents = tuple(parents)
        self.rescan_interval = rescan_interval
        self.pending: dict[str, Callable[[Path], None]] = {}
        self._by_name: dict[str, str] = {}  # directory name -> container id
        self._wds: dict[int, Path] = {}
        self._fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rescan: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        libc = ctypes.CDLL(None, use_errno=True)
        self._add_watch = libc.inotify_add_watch
        self._add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self._fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._watch(self.root)
        for parent in self.parents:
            self._watch(self.root / parent)
        self._loop.add_reader(self._fd, self._read)

    def _watch(self, path: Path) -> None:
        if path in self._wds.values() or not path.is_dir():
            return
        wd = self._add_watch(self._fd, os.fsencode(path), IN_CREATE | IN_MOVED_TO | IN_ONLYDIR)
        if wd >= 0:
            self._wds[wd] = path

    def wait_for(self, container_id: str, found: Callable[[Path], None]) -> None:
        """Call `found(path)` once the container's cgroup exists (at once if it does now)."""
        path = self.find(container_id)
        if path is not None:
            found(path)
            return
        self.pending[container_id] = found
        for name in cgroup_names(container_id):
            self._by_name[name] = container_id
        self._arm_rescan()

    def cancel(self, container_id: str) -> None:
        self.pending.pop(container_id, None)
        for name in cgroup_names(container_id):
            self._by_name.pop(name, None)

    def find(self, container_id: str) -> Path | None:
        """The container's cgroup if it exists with processes in it. An empty one is the last
        run's, not yet removed (`podman restart` is DEL, ADD, then a new cgroup of the same
        name): the new one's IN_CREATE resolves the wait instead."""
        for parent in (self.root / p for p in self.parents):
            for name in cgroup_names(container_id):
                if (parent / name).is_dir() and populated(parent / name):
                    return parent / name
        return None

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + EVENT.size <= len(data):
            wd, mask, _cookie, size = EVENT.unpack_from(data, offset)
            raw = data[offset + EVENT.size : offset + EVENT.size + size]
            offset += EVENT.size + size
            name = raw.rstrip(b"\0").decode(errors="replace")
            if mask & IN_Q_OVERFLOW:
                self._rescan_now()
                continue
            where = self._wds.get(wd)
            if where is None:
                continue
            if where == self.root and name in self.parents:
                self._watch(where / name)  # podman made libpod_parent with its first container
                self._rescan_now()
            container_id = self._by_name.get(name)
            if container_id is not None and where != self.root:
                self._resolve(container_id, where / name)

    def _resolve(self, container_id: str, path: Path) -> None:
        found = self.pending.get(container_id)
        self.cancel(container_id)
        if found is not None:
            found(path)

    def _rescan_now(self) -> None:
        for container_id in list(self.pending):
            path = self.find(container_id)
            if path is not None:
                self._resolve(container_id, path)

    def _arm_rescan(self) -> None:
        if self._rescan is None and self._loop is not None:
            self._rescan = self._loop.call_later(self.rescan_interval, self._tick)

    def _tick(self) -> None:
        self._rescan = None
        for parent in self.parents:
            self._watch(self.root / parent)
        self._rescan_now()
        if self.pending:
            self._arm_rescan()

    def close(self) -> None:
        if self._rescan is not None:
            self._rescan.cancel()
            self._rescan = None
        if self._fd >= 0:
            if self._loop is not None:
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        self.pending.clear()
        self._by_name.clear()
