"""Load the datapath once with bcc and pin it, or re-open what an earlier agent pinned.

Layout under the pin directory (one per node, e.g. /sys/fs/bpf/l7proxy/node1/):
  map_<name>   every map in structs.MAPS plus the ring buffer map_events
  prog_<name>  every program in structs.PROGRAMS
Programs stay attached to the tc hooks and cgroups while no agent runs; maps keep conntrack and
policy, so a restarted agent only re-opens the pins and established connections never notice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from redirect_bpf import bpfsys, structs
from redirect_bpf.maps import BpfMap, open_pinned_maps, release

SRC_DIR = Path(__file__).resolve().parent
SOURCE = SRC_DIR / "datapath.c"
BPF_FS = Path("/sys/fs/bpf")
PIN_ROOT = BPF_FS / "l7proxy"

BPF_CGROUP_INET4_CONNECT = 10  # bcc.BPFAttachType.CGROUP_INET4_CONNECT
BPF_CGROUP_INET6_CONNECT = 11
BPF_CGROUP_SOCK_OPS = 3
BPF_CGROUP_GETSOCKOPT = 21
BPF_PROG_TYPE_CGROUP_SOCKOPT = 25  # not among bcc 0.26's BPF.* constants


@dataclass
class Loaded:
    pin_dir: Path
    maps: dict[str, BpfMap]
    ringbuf_fd: int
    progs: dict[str, int]
    reused: bool
    bpf: object | None = None  # the bcc module when freshly compiled (the layout test reads it)
    extra_fds: list[int] = field(default_factory=list)

    def close(self) -> None:
        """Drop this process's fds; pinned objects and attachments stay in the kernel."""
        release(self.maps, [self.ringbuf_fd, *self.progs.values(), *self.extra_fds], self.bpf)
        self.maps, self.progs, self.ringbuf_fd, self.bpf = {}, {}, -1, None


def pin_dir_for(node: str) -> Path:
    return PIN_ROOT / node


def _pins_complete(pin_dir: Path) -> bool:
    names = [f"map_{n}" for n in (*structs.MAPS, structs.RINGBUF)]
    names += [f"prog_{n}" for n in structs.PROGRAMS]
    return all((pin_dir / n).exists() for n in names)


def open_pinned(pin_dir: Path) -> Loaded:
    maps = open_pinned_maps(pin_dir, structs.MAPS)
    try:
        ringbuf = bpfsys.obj_get(pin_dir / f"map_{structs.RINGBUF}")
        progs = {n: bpfsys.obj_get(pin_dir / f"prog_{n}") for n in structs.PROGRAMS}
    except Exception:
        release(maps, (), None)
        raise
    return Loaded(pin_dir, maps, ringbuf, progs, reused=True)


def compile_and_pin(pin_dir: Path, cflags: tuple[str, ...] = ()) -> Loaded:
    from bcc import BPF

    bpf = BPF(src_file=str(SOURCE), cflags=[f"-I{SRC_DIR}", *cflags])
    progs = {}
    for name in structs.PROGRAMS:
        if name == "sidecar_connect4":
            fn = bpf.load_func(name, BPF.CGROUP_SOCK_ADDR, attach_type=BPF_CGROUP_INET4_CONNECT)
        elif name == "sidecar_connect6":
            fn = bpf.load_func(name, BPF.CGROUP_SOCK_ADDR, attach_type=BPF_CGROUP_INET6_CONNECT)
        elif name == "sidecar_sockops":
            fn = bpf.load_func(name, BPF.SOCK_OPS)
        elif name == "sidecar_getsockopt":
            fn = bpf.load_func(
                name, BPF_PROG_TYPE_CGROUP_SOCKOPT, attach_type=BPF_CGROUP_GETSOCKOPT
            )
        else:
            fn = bpf.load_func(name, BPF.SCHED_CLS)
        progs[name] = fn.fd
    pin_dir.mkdir(parents=True, exist_ok=True)
    maps = {}
    for name, (key, value, percpu) in structs.MAPS.items():
        fd = os.dup(bpf[name.encode()].get_fd())
        maps[name] = BpfMap(name, fd, key, value, percpu)
        bpfsys.obj_pin(fd, pin_dir / f"map_{name}")
    ringbuf = os.dup(bpf[structs.RINGBUF.encode()].get_fd())
    bpfsys.obj_pin(ringbuf, pin_dir / f"map_{structs.RINGBUF}")
    own_progs = {}
    for name, fd in progs.items():
        own_progs[name] = os.dup(fd)
        bpfsys.obj_pin(fd, pin_dir / f"prog_{name}")
    return Loaded(pin_dir, maps, ringbuf, own_progs, reused=False, bpf=bpf)


def load(pin_dir: Path, cflags: tuple[str, ...] = ()) -> Loaded:
    """Re-open a complete set of pins, else compile, load and pin a fresh datapath.

    Endpoints attached by an older build keep its programs until attach_endpoint() replaces
    them; tracked flows whose conntrack entry is lost are checked packet by packet (no SYN,
    no new entry), so connections the policy allows survive even that."""
    if _pins_complete(pin_dir):
        try:
            return open_pinned(pin_dir)
        except ValueError:
            pass  # pinned by a build with another struct layout: rebuild (conntrack is lost)
    unpin(pin_dir)  # a half-written set from a crash, or an old layout: start clean
    return compile_and_pin(pin_dir, cflags)


def unpin(pin_dir: Path) -> None:
    if not pin_dir.exists():
        return
    for entry in pin_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):
            entry.unlink()
    with contextlib.suppress(OSError):
        pin_dir.rmdir()
    with contextlib.suppress(OSError):
        pin_dir.parent.rmdir()  # only when no other node's pins remain
