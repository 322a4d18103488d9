"""cgroup v2 attachment of the sidecar programs: attach once (a restarted agent finds its pinned
programs still attached), detach, and find a cgroup's path from its id."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from redirect_bpf import bpfsys, loader

BPF_F_ALLOW_MULTI = 2
CGROUP_V2_ROOT = Path("/sys/fs/cgroup/unified")
SIDECAR_HOOKS = (
    ("sidecar_connect4", loader.BPF_CGROUP_INET4_CONNECT),
    ("sidecar_connect6", loader.BPF_CGROUP_INET6_CONNECT),
    ("sidecar_sockops", loader.BPF_CGROUP_SOCK_OPS),
)


def cgroup_path_of(cgroup_id: int) -> str | None:
    """The cgroup v2 directory whose inode number is this cgroup id."""
    for dirpath, _dirs, _files in os.walk(CGROUP_V2_ROOT):
        with contextlib.suppress(OSError):
            if os.stat(dirpath).st_ino == cgroup_id:
                return dirpath
    return None


def attach_once(prog_fd: int, cgroup_fd: int, kind: int) -> None:
    """Attaching the same program twice is an error (EINVAL), so look first."""
    if bpfsys.prog_id(prog_fd) not in bpfsys.attached_prog_ids(cgroup_fd, kind):
        bpfsys.prog_attach(prog_fd, cgroup_fd, kind, BPF_F_ALLOW_MULTI)


def open_dir(path: str | Path) -> int:
    return os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
