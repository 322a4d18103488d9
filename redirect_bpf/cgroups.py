"""cgroup v2 attachment of the sidecar programs: attach once (a restarted agent finds its pinned
programs still attached), detach, and find a cgroup's path from its id."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from redirect_bpf import bpfsys, loader, structs

BPF_F_ALLOW_MULTI = 2
CGROUP_V2_ROOT = Path("/sys/fs/cgroup/unified")
SIDECAR_HOOKS = (
    ("sidecar_connect4", loader.BPF_CGROUP_INET4_CONNECT),
    ("sidecar_connect6", loader.BPF_CGROUP_INET6_CONNECT),
    ("sidecar_sockops", loader.BPF_CGROUP_SOCK_OPS),
)
PROXY_HOOKS = (("sidecar_getsockopt", loader.BPF_CGROUP_GETSOCKOPT),)


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


class CgroupHooks:
    """The cgroups this datapath attached programs to, with the directory fds that keep them.

    Sidecar cgroups get the connect/sockops hooks (their connect() calls that policy marks for L7
    go to the sidecar); the proxy's own cgroup gets the getsockopt hook (SO_ORIGINAL_DST). A
    cgroup attached by an earlier agent has no fd here: detaching opens it by path."""

    def __init__(self, progs: dict[str, int], endpoints_by_cgroup) -> None:
        self._progs = progs
        self._ep_by_cgroup = endpoints_by_cgroup
        self.sidecar_fds: dict[str, int] = {}
        self.proxy_fds: dict[str, int] = {}

    def _attach(self, table: dict[str, int], path: str, hooks) -> None:
        fd = open_dir(path)
        try:
            for prog, kind in hooks:
                attach_once(self._progs[prog], fd, kind)
        except OSError:
            os.close(fd)
            raise
        old_fd = table.pop(path, None)
        if old_fd is not None:
            os.close(old_fd)
        table[path] = fd

    def _detach(self, table: dict[str, int], path: str, hooks) -> int | None:
        """Detach `hooks` from `path`; returns the cgroup id, or None when it is gone."""
        fd = table.pop(path, None)
        if fd is None:
            try:
                fd = open_dir(path)
            except OSError:
                return None
        for prog, kind in hooks:
            with contextlib.suppress(OSError):
                bpfsys.prog_detach(self._progs[prog], fd, kind)
        try:
            return os.fstat(fd).st_ino
        finally:
            os.close(fd)

    def attach_sidecar(self, path: str, cgroup_id: int, info) -> None:
        self._ep_by_cgroup.put(structs.u64(cgroup_id), info)
        self._attach(self.sidecar_fds, path, SIDECAR_HOOKS)

    def detach_sidecar(self, path: str) -> None:
        cgroup_id = self._detach(self.sidecar_fds, path, SIDECAR_HOOKS)
        if cgroup_id is not None:
            with contextlib.suppress(OSError):
                self._ep_by_cgroup.delete(structs.u64(cgroup_id))

    def attach_proxy(self, path: str) -> None:
        self._attach(self.proxy_fds, path, PROXY_HOOKS)

    def detach_proxy(self, path: str) -> None:
        self._detach(self.proxy_fds, path, PROXY_HOOKS)

    def close(self) -> None:
        for fd in [*self.sidecar_fds.values(), *self.proxy_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.sidecar_fds, self.proxy_fds = {}, {}
