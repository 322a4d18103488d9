"""Find and remove what agents left in the kernel (`l7proxy uninstall`).

An agent leaves its datapath in place when it stops, on purpose (a restart re-opens it and loses no
connection): pinned maps and programs under the BPF filesystem, tc clsact filters on endpoint
veths, cgroup connect/sockops/getsockopt hooks, the sk_assign policy-routing rule, and a proxy
worker process (`--proxy-worker process`). After an uninstall, or a `kill -9`, nothing removes
them; this module does, from what the kernel shows, not from what a dead agent remembered:

- pin directories are recognised by their contents (only our map_*/prog_* names);
- tc filters by the program ids of those pins, or by the filter name the datapath gives them;
- cgroup hooks by the same program ids, or (pins gone) by program name below the agent's cgroups.

With `pin_dir` set, only that datapath is removed (its programs are known by their pins), so the
other agents of the host keep theirs. Every step reports what it removed; running it again finds
nothing.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
import socket
import struct
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from l7proxy import proc
from l7proxy.agent.netdev import AGENT_CGROUPS
from l7proxy.agent.proxy_worker_control import WORKER_MODULES, stop_worker
from redirect_bpf import bpfsys, cgroups, loader, nodeport, routing, sock_lb, structs, tc

PIN_NAMES = frozenset(
    [f"map_{n}" for n in (*structs.MAPS, structs.RINGBUF)]
    + [f"prog_{n}" for n in structs.PROGRAMS]
    + sock_lb.PIN_NAMES  # the services' socket LB: its maps, programs and cgroup links
    + nodeport.PIN_NAMES  # NodePort: its maps and tc programs (filters found by program id)
)
TC_FILTER_NAME = "l7proxy"  # the name redirect_bpf.tc gives its filters
TCA_BPF_ID = 11  # linux/pkt_cls.h: the filter's program id
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
CGROUP_HOOKS = tuple(sorted({kind for _, kind in (*cgroups.SIDECAR_HOOKS, *cgroups.PROXY_HOOKS)}))
CGROUP_PROG_PREFIX = b"sidecar_"  # the cgroup programs' names (the kernel keeps 15 bytes)
DEFAULT_PIN_DIR = loader.PIN_ROOT / "default"
PROG_INFO_NAME = slice(64, 80)  # struct bpf_prog_info: char name[BPF_OBJ_NAME_LEN] at offset 64


@dataclass
class Report:
    removed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # found, but left alone (and why)

    def did(self, what: str) -> None:
        self.removed.append(what)


# -- what runs -----------------------------------------------------------------------------------


def _cmdlines() -> dict[int, list[str]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                raw = (entry / "cmdline").read_bytes()
                if raw:
                    out[int(entry.name)] = raw.rstrip(b"\0").decode(errors="replace").split("\0")
    return out


def agent_args(argv: list[str]) -> list[str] | None:
    """The arguments after `l7proxy agent` in a command line; None for any other process."""
    for i, arg in enumerate(argv[:-1]):
        if os.path.basename(arg) == "l7proxy" and argv[i + 1] == "agent":
            return argv[i + 2 :]
    return None


def agent_pin_dir(args: list[str]) -> Path | None:
    """The pin directory an agent with these arguments uses; None with --no-bpf."""
    if "--no-bpf" in args:
        return None
    pin_dir = DEFAULT_PIN_DIR
    for j, arg in enumerate(args):
        if arg == "--bpf-dir" and j + 1 < len(args):
            pin_dir = Path(args[j + 1])
        elif arg.startswith("--bpf-dir="):
            pin_dir = Path(arg.partition("=")[2])
    return Path(os.path.normpath(pin_dir))


def running_agents(pin_dir: Path | None = None) -> dict[int, Path | None]:
    """pid -> pin directory (None: --no-bpf) of every running agent; with `pin_dir`, only the
    agent that uses it."""
    want = Path(os.path.normpath(pin_dir)) if pin_dir is not None else None
    out = {}
    for pid, argv in _cmdlines().items():
        args = agent_args(argv)
        if args is None:
            continue
        used = agent_pin_dir(args)
        if want is None or used == want:
            out[pid] = used
    return out


def worker_pids() -> list[int]:
    names = [m.decode().rstrip("\0") for m in WORKER_MODULES]
    return sorted(
        pid
        for pid, argv in _cmdlines().items()
        if any(a == n for a in argv for n in names) and "-m" in argv
    )


# -- pins --------------------------------------------------------------------------------------


def pin_dirs(root: Path = loader.BPF_FS, depth: int = 4) -> list[Path]:
    """Directories on the BPF filesystem that hold our pins and nothing else."""
    found = []

    def walk(path: Path, level: int) -> None:
        try:
            entries = list(path.iterdir())
        except OSError:
            return
        names = {e.name for e in entries}
        if names and names <= PIN_NAMES:
            found.append(path)
            return
        if level < depth:
            for e in entries:
                if e.is_dir() and not e.is_symlink():
                    walk(e, level + 1)

    walk(root, 0)
    return sorted(found)


def pinned_prog_ids(pin_dir: Path) -> set[int]:
    ids = set()
    for pin in pin_dir.glob("prog_*"):
        with contextlib.suppress(OSError):
            fd = bpfsys.obj_get(pin)
            try:
                ids.add(bpfsys.prog_id(fd))
            finally:
                os.close(fd)
    return ids


def unpin(pin_dir: Path, report: Report) -> None:
    entries = sorted(e.name for e in pin_dir.iterdir()) if pin_dir.is_dir() else []
    for name in entries:
        with contextlib.suppress(FileNotFoundError):
            (pin_dir / name).unlink()
    with contextlib.suppress(OSError):
        pin_dir.rmdir()
    maps = sum(n.startswith("map_") for n in entries)
    progs = sum(n.startswith("prog_") for n in entries)
    report.did(f"pins {pin_dir} ({maps} maps, {progs} programs)")
    if pin_dir.parent == loader.PIN_ROOT:
        with contextlib.suppress(OSError):
            loader.PIN_ROOT.rmdir()  # only when no other node's pins remain


# -- tc ----------------------------------------------------------------------------------------


def _bpf_filters(ipr: IPRoute, ifindex: int, parent: str) -> list:
    try:
        return [
            f for f in ipr.get_filters(ifindex, parent=parent) if f.get_attr("TCA_KIND") == "bpf"
        ]
    except NetlinkError:
        return []  # no clsact on this link


def filter_prog_id(opts) -> int | None:
    """The program id of a bpf filter (TCA_BPF_ID: pyroute2 leaves it undecoded)."""
    for slot in opts["attrs"]:
        cell = slot.cell[1]
        data, offset = getattr(cell, "data", None), getattr(cell, "offset", None)
        if data is None or offset is None or len(data) < offset + 8:
            continue
        length, kind = struct.unpack_from("HH", data, offset)
        if kind & NLA_TYPE_MASK == TCA_BPF_ID and length == 8:
            return struct.unpack_from("I", data, offset + 4)[0]
    return None


def _filter_is_ours(f, prog_ids: set[int], by_name: bool) -> bool:
    opts = f.get_attr("TCA_OPTIONS")
    if opts is None:
        return False
    if filter_prog_id(opts) in prog_ids:
        return True
    name = opts.get_attr("TCA_BPF_NAME") or ""
    return by_name and name.split(":")[0] == TC_FILTER_NAME


def remove_tc(prog_ids: set[int], by_name: bool, report: Report) -> None:
    """Our filters on every link of this namespace: the clsact goes with them when it holds
    nothing else (the datapath added it), else only our filters are deleted."""
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifindex, ifname = link["index"], link.get_attr("IFLA_IFNAME")
            by_parent = {p: _bpf_filters(ipr, ifindex, p) for p in (tc.INGRESS, tc.EGRESS)}
            ours = {
                p: [f for f in fs if _filter_is_ours(f, prog_ids, by_name)]
                for p, fs in by_parent.items()
            }
            if not any(ours.values()):
                continue
            foreign = any(
                not _filter_is_ours(f, prog_ids, by_name) and f.get_attr("TCA_OPTIONS") is not None
                for fs in by_parent.values()
                for f in fs
            )
            if not foreign:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del", "clsact", ifindex)
                report.did(f"tc clsact and its BPF filters on {ifname}")
                continue
            for parent, filters in ours.items():
                for f in filters:
                    try:
                        ipr.tc(
                            "del-filter", "bpf", ifindex, f["handle"], parent=parent, info=f["info"]
                        )
                    except NetlinkError as exc:
                        report.kept.append(f"tc filter on {ifname}: {exc}")
            report.did(f"tc BPF filters on {ifname} (other filters there kept)")


# -- cgroups -----------------------------------------------------------------------------------


@cache
def _libbpf() -> ct.CDLL:
    so = bpfsys.lib()
    so.bpf_prog_get_fd_by_id.restype, so.bpf_prog_get_fd_by_id.argtypes = ct.c_int, [ct.c_uint32]
    so.bpf_obj_get_info_by_fd.restype = ct.c_int
    so.bpf_obj_get_info_by_fd.argtypes = [ct.c_int, ct.c_void_p, ct.POINTER(ct.c_uint32)]
    return so


def prog_fd_by_id(prog_id: int) -> int:
    fd = _libbpf().bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        err = ct.get_errno() or -fd
        raise OSError(err, f"prog {prog_id}: {os.strerror(err)}")
    return fd


def prog_name(fd: int) -> bytes:
    buf = (ct.c_ubyte * 256)()
    size = ct.c_uint32(ct.sizeof(buf))
    if _libbpf().bpf_obj_get_info_by_fd(fd, buf, ct.byref(size)) < 0:
        return b""
    return bytes(buf[PROG_INFO_NAME]).split(b"\0")[0]


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def remove_cgroup_hooks(prog_ids: set[int], by_name: bool, report: Report) -> list[Path]:
    """Detach our programs from every cgroup v2 directory; returns the cgroups they were on."""
    touched = []
    for dirpath, _dirs, _files in os.walk(cgroups.CGROUP_V2_ROOT):
        path = Path(dirpath)
        try:
            cg_fd = cgroups.open_dir(path)
        except OSError:
            continue
        try:
            detached = []
            for kind in CGROUP_HOOKS:
                try:
                    attached = bpfsys.attached_prog_ids(cg_fd, kind)
                except OSError:
                    continue
                for pid in sorted(attached):
                    with contextlib.suppress(OSError):
                        fd = prog_fd_by_id(pid)
                        try:
                            mine = pid in prog_ids or (
                                by_name
                                and _under(path, AGENT_CGROUPS)
                                and prog_name(fd).startswith(CGROUP_PROG_PREFIX)
                            )
                            if mine:
                                bpfsys.prog_detach(fd, cg_fd, kind)
                                detached.append(prog_name(fd).decode() or str(pid))
                        finally:
                            os.close(fd)
            if detached:
                report.did(f"cgroup hooks on {path} ({', '.join(detached)})")
                touched.append(path)
        finally:
            os.close(cg_fd)
    return touched


def remove_agent_cgroups(candidates: list[Path], everything: bool, report: Report) -> None:
    """The endpoints' cgroups the sidecar mode made (below AGENT_CGROUPS), when empty."""
    dirs = [p for p in candidates if _under(p, AGENT_CGROUPS) and p != AGENT_CGROUPS]
    if everything and AGENT_CGROUPS.is_dir():
        dirs += [p for p in AGENT_CGROUPS.iterdir() if p.is_dir()]
    for path in sorted(set(dirs), reverse=True):
        try:
            path.rmdir()
        except FileNotFoundError:
            continue
        except OSError:
            report.kept.append(f"cgroup {path}: processes still run in it")
            continue
        report.did(f"cgroup {path}")
    if everything:
        with contextlib.suppress(OSError):
            AGENT_CGROUPS.rmdir()
            report.did(f"cgroup {AGENT_CGROUPS}")


# -- routing and the worker ----------------------------------------------------------------------


def has_proxy_routing() -> bool:
    with IPRoute() as ipr:
        return any(
            r.get_attr("FRA_TABLE") == routing.PROXY_ROUTE_TABLE
            and r.get_attr("FRA_FWMARK") is not None
            for r in ipr.get_rules(family=socket.AF_INET)
        )


# -- the whole run -------------------------------------------------------------------------------


def uninstall(pin_dir: Path | None = None, state_dir: Path | None = None) -> Report:
    """Remove every agent's kernel state (or only the datapath pinned at `pin_dir`)."""
    report = Report()
    scoped = pin_dir is not None
    dirs = ([pin_dir] if pin_dir.is_dir() else []) if scoped else pin_dirs()
    prog_ids: set[int] = set()
    for d in dirs:
        prog_ids |= pinned_prog_ids(d)
    remove_tc(prog_ids, not scoped, report)
    touched = remove_cgroup_hooks(prog_ids, not scoped, report)
    for d in dirs:
        unpin(d, report)
    remove_agent_cgroups(touched, not scoped, report)
    if state_dir is not None:
        before = worker_pids()
        stop_worker(state_dir)
        for pid in sorted(set(before) - set(worker_pids())):
            report.did(f"proxy worker process {pid}")
    elif not scoped:
        for pid in worker_pids():
            proc.stop([pid])
            report.did(f"proxy worker process {pid}")
    elif workers := worker_pids():
        report.kept.append(
            f"proxy worker process(es) {', '.join(map(str, workers))}: give --state-dir to stop "
            "the one of this agent"
        )
    # The routing rule is shared by every datapath of the host: it goes with the last one.
    bpf_agents = [d for d in running_agents().values() if d is not None]
    if not pin_dirs() and not bpf_agents and has_proxy_routing():
        routing.remove_proxy_routing()
        report.did(
            f"policy routing for proxied packets (rule pref {routing.PROXY_RULE_PRIORITY}, "
            f"table {routing.PROXY_ROUTE_TABLE})"
        )
    return report
