"""Load, pin, attach and fill the socket-level load balancer (sock_lb.c).

    lb = SockLB(pin_dir)                       # compiled once, re-opened from pins after that
    lb.attach("/sys/fs/cgroup/unified")        # every process below this cgroup v2 directory
    lb.sync([LbService(...), ...])             # the whole desired set; writes only the diff
    lb.close()                                 # agent exit: programs keep translating
    lb.destroy()                               # detach and unpin

Its pins sit in the datapath's pin directory under names of their own (map_lb_*,
prog_sock_lb_*, link_sock_lb_*), and the attachments are BPF links pinned there too: whoever
removes the directory (the datapath's loader when it starts over, `l7proxy uninstall`, `lab
down`, a test's clean-up) also detaches the programs, so no attachment outlives its pins.
Links attach with BPF_F_PREORDER: sidecar mode attaches its connect4 redirection to each
endpoint's (child) cgroup, and a child's programs normally run before the parent's; PREORDER
(Linux 6.15) runs this translation first, so the sidecar's policy check and redirection see the
backend, not the VIP. Kernels without it get plain multi-attach order; `attach()` returns the
flags used.
"""

from __future__ import annotations

import ctypes as ct
import errno
import heapq
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from redirect_bpf import bpfsys
from redirect_bpf import sock_lb_structs as S
from redirect_bpf.maps import BpfMap, open_pinned_maps, release

SRC_DIR = Path(__file__).resolve().parent
SOURCE = SRC_DIR / "sock_lb.c"

BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
ATTACH_TYPES = {  # enum bpf_attach_type
    "sock_lb_connect4": 10,  # BPF_CGROUP_INET4_CONNECT
    "sock_lb_sendmsg4": 14,  # BPF_CGROUP_UDP4_SENDMSG
    "sock_lb_recvmsg4": 19,  # BPF_CGROUP_UDP4_RECVMSG
    "sock_lb_getpeername4": 29,  # BPF_CGROUP_INET4_GETPEERNAME (Linux 5.8)
}
BPF_F_PREORDER = 1 << 6
OBJECT_PINS = [f"map_{n}" for n in S.MAPS] + [f"prog_{n}" for n in S.PROGRAMS]
LINK_PINS = [f"link_{n}" for n in S.PROGRAMS]  # the attachments: unpinning one detaches it
PIN_NAMES = OBJECT_PINS + LINK_PINS


class _LinkOpts(ct.Structure):
    """The head of libbpf's struct bpf_link_create_opts (sz, flags); the rest stays zero."""

    _fields_ = [("sz", ct.c_size_t), ("flags", ct.c_uint32), ("pad", ct.c_uint32)]


def _link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int) -> int:
    fn = bpfsys.lib().bpf_link_create
    fn.restype, fn.argtypes = ct.c_int, [ct.c_int, ct.c_int, ct.c_int, ct.c_void_p]
    opts = _LinkOpts(ct.sizeof(_LinkOpts), flags, 0)
    fd = fn(prog_fd, target_fd, attach_type, ct.byref(opts))
    if fd < 0:
        err = ct.get_errno() or -fd
        raise OSError(err, f"link create: {os.strerror(err)}")
    return fd


@dataclass(frozen=True, slots=True)
class LbService:
    """One frontend as the kernel sees it. `maglev` is the lookup table (slot -> index into
    `backends`; its length is the table size M, up to MAGLEV_MAX_M), or None for random
    selection."""

    vip: str
    port: int
    proto: str  # "TCP" | "UDP"
    backends: tuple[tuple[str, int], ...]
    affinity_timeout: int = 0
    maglev: tuple[int, ...] | None = None

    @property
    def frontend(self) -> tuple[str, int, str]:
        return (self.vip, self.port, self.proto)


@dataclass
class _Written:
    svc_id: int
    rev: int  # the revision lb_services names
    service: LbService
    backend_ids: tuple[int, ...]
    slots: int = 0  # lb_slots entries (rev, 1..n)
    maglev_chunks: int = 0  # lb_maglev entries (rev, 0..n-1)


@dataclass
class _Retired:
    """What one sync replaced: deleted after an RCU grace period."""

    revs: list[tuple[int, int, int]] = field(default_factory=list)  # (rev, slots, chunks)
    backends: list[tuple[int, int]] = field(default_factory=list)  # (service id, backend id)
    svc_ids: list[int] = field(default_factory=list)

    def rev(self, old: _Written) -> None:
        self.revs.append((old.rev, old.slots, old.maglev_chunks))

    def backend(self, svc_id: int, bid: int) -> None:
        self.backends.append((svc_id, bid))

    def __bool__(self) -> bool:
        return bool(self.revs or self.backends or self.svc_ids)


@cache
def _libc() -> ct.CDLL:
    return ct.CDLL(None, use_errno=True)


MEMBARRIER_CMD_GLOBAL = 1
SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283}


def rcu_barrier() -> None:
    """Wait until every BPF program running now has finished: the LB's programs run inside an
    RCU read-side section, and membarrier(MEMBARRIER_CMD_GLOBAL) is synchronize_rcu() (a few
    ms). Without it (another architecture, nohz_full), a pause well above any program's run."""
    number = SYS_MEMBARRIER.get(os.uname().machine)
    if number is not None and _libc().syscall(number, MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
        return
    time.sleep(0.05)


def unpin(pin_dir: Path) -> None:
    """Remove this LB's pins (links first: that detaches), never the datapath's."""
    bpfsys.unlink_pins(pin_dir, LINK_PINS + OBJECT_PINS)


class SockLB:
    def __init__(self, pin_dir: str | Path, cflags: Iterable[str] = ()) -> None:
        self.pin_dir = Path(pin_dir)
        self.bpf = None
        self.reused = bpfsys.pins_present(self.pin_dir, OBJECT_PINS)
        if self.reused:
            try:
                self._open()
            except ValueError:  # an older struct layout: start over
                self.reused = False
        if not self.reused:
            unpin(self.pin_dir)
            self._compile(tuple(cflags))
        self._lock = threading.Lock()
        self._written: dict[tuple[str, int, str], _Written] = {}
        self._recover()
        self._svc_ids = IdPool(w.svc_id for w in self._written.values())
        self._backend_ids = IdPool(b for w in self._written.values() for b in w.backend_ids)
        self._revs = IdPool(w.rev for w in self._written.values())
        self.attached: dict[str, int] = {}  # cgroup path -> flags used
        self.last_sync = (0, 0)  # (services changed, map writes)

    # -- load ----------------------------------------------------------------------------------

    def _open(self) -> None:
        self.maps = {}  # close() works whatever the open raises
        self.maps = open_pinned_maps(self.pin_dir, S.MAPS)  # an older layout raises
        self.progs = {n: bpfsys.obj_get(self.pin_dir / f"prog_{n}") for n in S.PROGRAMS}

    def _compile(self, cflags: tuple[str, ...]) -> None:
        from bcc import BPF

        bpf = BPF(src_file=str(SOURCE).encode(), cflags=[f"-I{SRC_DIR}", *cflags])
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self.progs = {}
        for name, attach_type in ATTACH_TYPES.items():
            fn = bpf.load_func(
                name.encode(), BPF_PROG_TYPE_CGROUP_SOCK_ADDR, attach_type=attach_type
            )
            self.progs[name] = os.dup(fn.fd)
            bpfsys.obj_pin(fn.fd, self.pin_dir / f"prog_{name}")
        self.maps = {}
        for name, (key, value) in S.MAPS.items():
            fd = os.dup(bpf[name.encode()].get_fd())
            self.maps[name] = BpfMap(name, fd, key, value)
            bpfsys.obj_pin(fd, self.pin_dir / f"map_{name}")
        self.bpf = bpf  # kept for the layout test; cleanup() drops bcc's own fds on close

    # -- attach --------------------------------------------------------------------------------

    def attach(self, cgroup: str | Path) -> int:
        """Attach every program to one cgroup v2 directory through pinned links (a restarted
        agent finds them and attaches nothing); returns the flags used."""
        path = str(cgroup)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        used = BPF_F_PREORDER
        try:
            for name, kind in ATTACH_TYPES.items():
                pin = self.pin_dir / f"link_{name}"
                if pin.exists():
                    continue
                try:
                    link = _link_create(self.progs[name], fd, kind, used)
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not used:
                        raise
                    used = 0  # a kernel before 6.15: no PREORDER
                    link = _link_create(self.progs[name], fd, kind, used)
                try:
                    bpfsys.obj_pin(link, pin)
                finally:
                    os.close(link)
        finally:
            os.close(fd)
        self.attached[path] = used
        return used

    def detach(self) -> None:
        """Unpin the links: the programs leave the cgroup."""
        self.attached.clear()
        bpfsys.unlink_pins(self.pin_dir, LINK_PINS)

    # -- services ------------------------------------------------------------------------------

    def _recover(self) -> None:
        """What an earlier agent wrote (re-opened pins): ids stay, only the diff is written.
        What no service's revision uses any more (an agent stopped in the middle of a sync)
        is deleted."""
        m = self.maps
        live_revs: set[int] = set()
        for key, svc in m["lb_services"].items():
            rev = m["lb_revs"].get(S.u32(svc.rev))
            if rev is None:  # cannot be written so; written anew if still wanted
                m["lb_services"].delete(key)
                continue
            ids, backends = [], []
            for slot in range(1, rev.count + 1):
                bid = m["lb_slots"].get(S.SlotKey(svc.rev, slot))
                be = m["lb_backends"].get(bid) if bid is not None else None
                if be is None:
                    break
                ids.append(bid.value)
                backends.append((S.ip_of(be.ip), S.port_of(be.port)))
            proto = next((n for n, v in S.PROTO.items() if v == key.proto), "TCP")
            lbs = LbService(
                S.ip_of(key.vip),
                S.port_of(key.port),
                proto,
                tuple(backends),
                rev.affinity_timeout_s,
                () if rev.flags & S.LB_FLAG_MAGLEV else None,  # rewritten on the first sync
            )
            chunks = -(-rev.maglev_m // S.MAGLEV_CHUNK) if rev.flags & S.LB_FLAG_MAGLEV else 0
            self._written[lbs.frontend] = _Written(
                rev.svc_id, svc.rev, lbs, tuple(ids), rev.count, chunks
            )
            live_revs.add(svc.rev)
        used = {b for w in self._written.values() for b in w.backend_ids}
        for key, rev in m["lb_revs"].items():
            if key.value not in live_revs:
                chunks = -(-rev.maglev_m // S.MAGLEV_CHUNK) if rev.flags & S.LB_FLAG_MAGLEV else 0
                self._delete_rev(key.value, rev.count, chunks)
        for key in m["lb_backends"].keys():
            if key.value not in used:
                m["lb_backends"].delete(key)

    def translated_from(self, cookie: int, ip: str, port: int) -> tuple[str, int] | None:
        """The VIP:port a socket (by its cookie) was connected through to backend ip:port, or
        None if the LB did not translate it (or its entry was evicted)."""
        val = self.maps["lb_revnat"].get(S.RevnatKey(cookie, S.be32(ip), S.be16(port), 0))
        return None if val is None else (S.ip_of(val.vip), S.port_of(val.port))

    def stats(self) -> dict[tuple[str, int, str], tuple[int, int, int, int]]:
        """frontend -> (connects, datagrams, no backend, NodePort flows) since the service got
        its id."""
        with self._lock:
            ids = {w.svc_id: f for f, w in self._written.items()}
        out = {}
        for key, st in self.maps["lb_svc_stats"].items():
            frontend = ids.get(key.value)
            if frontend is not None:
                out[frontend] = (st.connects, st.datagrams, st.no_backend, st.nodeport)
        return out

    def services(self) -> dict[tuple[str, int, str], LbService]:
        return {f: w.service for f, w in self._written.items()}

    def sync(self, desired: Iterable[LbService]) -> tuple[int, int]:
        """Make the maps hold exactly `desired`; returns (services changed, map writes).

        Nothing a concurrent connect() may be reading is modified or deleted while it may read
        it (Cilium's order, plus an RCU wait): (1) each new or changed service gets a new
        revision, written in full beside the old one (its backends that are new, its slots, its
        Maglev rows, its lb_revs entry); (2) each service's lb_services entry is pointed at its
        new revision (removed services' entries deleted); (3) after one RCU grace period, when
        no program still runs with the old entries, the old revisions and the backends only
        they used are deleted, and only then are their ids handed out again. So a connect()
        picks from one consistent revision, old or new, and an id is never reused under it."""
        with self._lock:
            m = self.maps
            want = {s.frontend: s for s in desired}
            writes = changed = 0
            retired = _Retired()
            fresh: list[tuple[_Written, _Written | None]] = []
            for frontend, service in want.items():
                old = self._written.get(frontend)
                if old is not None and old.service == service:
                    continue
                new, n = self._write_rev(service, old)
                fresh.append((new, old))
                writes += n
                changed += 1
            for new, old in fresh:
                m["lb_services"].put(self._key(new.service), S.Svc(new.rev, 0))
                writes += 1
                self._written[new.service.frontend] = new
                if old is not None:
                    retired.rev(old)
                    for bid in set(old.backend_ids) - set(new.backend_ids):
                        retired.backend(old.svc_id, bid)
            for frontend in [f for f in self._written if f not in want]:
                old = self._written.pop(frontend)
                m["lb_services"].delete(self._key(old.service))
                writes += 1
                changed += 1
                retired.rev(old)
                for bid in old.backend_ids:
                    retired.backend(old.svc_id, bid)
                retired.svc_ids.append(old.svc_id)
            if retired:
                rcu_barrier()
                writes += self._delete_retired(retired)
            self.last_sync = (changed, writes)
            return self.last_sync

    @staticmethod
    def _key(service: LbService) -> S.SvcKey:
        return S.SvcKey(S.be32(service.vip), S.be16(service.port), S.PROTO[service.proto], 0)

    def _write_rev(self, service: LbService, old: _Written | None) -> tuple[_Written, int]:
        """A new revision of a service, beside whatever is in use; returns it and the writes."""
        m = self.maps
        svc_id = old.svc_id if old else self._svc_ids.take()
        if old is None:  # a reused id starts its counters over
            m["lb_svc_stats"].delete(S.u32(svc_id))
        rev = self._revs.take()
        proto = S.PROTO[service.proto]
        # Backends keep their id while they stay (affinity to them survives a change of others)
        kept = dict(zip(old.service.backends, old.backend_ids, strict=True)) if old else {}
        ids = []
        writes = 0
        for ip, port in service.backends:
            bid = kept.get((ip, port))
            if bid is None:
                bid = self._backend_ids.take()
                m["lb_backends"].put(S.u32(bid), S.Backend(S.be32(ip), S.be16(port), proto))
                writes += 1
            ids.append(bid)
        for slot, bid in enumerate(ids, start=1):
            m["lb_slots"].put(S.SlotKey(rev, slot), S.u32(bid))
            writes += 1
        flags = S.LB_FLAG_AFFINITY if service.affinity_timeout else 0
        size = chunks = 0
        if service.maglev is not None and ids:
            size = len(service.maglev)
            if not 0 < size <= S.MAGLEV_MAX_M:
                raise ValueError(f"a Maglev table has 1-{S.MAGLEV_MAX_M} slots, not {size}")
            table = [ids[i] for i in service.maglev]
            chunks = -(-size // S.MAGLEV_CHUNK)
            for c in range(chunks):
                part = table[c * S.MAGLEV_CHUNK : (c + 1) * S.MAGLEV_CHUNK]
                chunk = S.MaglevChunk()
                chunk.ids[: len(part)] = part
                m["lb_maglev"].put(S.MaglevKey(rev, c), chunk)
                writes += 1
            flags |= S.LB_FLAG_MAGLEV
        entry = S.Rev(
            self._key(service), svc_id, len(ids), flags, 0, service.affinity_timeout, size
        )
        m["lb_revs"].put(S.u32(rev), entry)
        writes += 1
        return _Written(svc_id, rev, service, tuple(ids), len(ids), chunks), writes

    def _delete_rev(self, rev: int, slots: int, chunks: int) -> int:
        m = self.maps
        m["lb_revs"].delete(S.u32(rev))
        for slot in range(1, slots + 1):
            m["lb_slots"].delete(S.SlotKey(rev, slot))
        for c in range(chunks):
            m["lb_maglev"].delete(S.MaglevKey(rev, c))
        return 1 + slots + chunks

    def _delete_retired(self, retired: _Retired) -> int:
        """After the grace period: old revisions, the backends that left, their affinity pins;
        then their ids go back to the pools."""
        writes = 0
        for rev, slots, chunks in retired.revs:
            writes += self._delete_rev(rev, slots, chunks)
            self._revs.give(rev)
        for _, bid in retired.backends:
            self.maps["lb_backends"].delete(S.u32(bid))
            writes += 1
        writes += self._drop_affinity(set(retired.backends))
        for _, bid in retired.backends:
            self._backend_ids.give(bid)
        for svc_id in retired.svc_ids:
            self.maps["lb_svc_stats"].delete(S.u32(svc_id))
            self._svc_ids.give(svc_id)
        return writes

    def _drop_affinity(self, gone: set[tuple[int, int]]) -> int:
        """Forget the clients pinned to backends that left their service. The program would
        skip a pin whose backend id is gone, but ids are reused (the lowest free first): a
        stale pin could then send the client to another service's new backend."""
        if not gone:
            return 0
        aff = self.maps["lb_affinity"]
        stale = [k for k, v in aff.items() if (k.svc_id, v.backend_id) in gone]
        for key in stale:
            aff.delete(key)
        return len(stale)

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Drop this process's fds; pins and attachments stay (the kernel keeps translating)."""
        release(self.maps, self.progs.values(), self.bpf)
        self.maps, self.progs, self.bpf = {}, {}, None

    def destroy(self) -> None:
        """Detach (unpin the links) and remove every pin of this LB."""
        self.detach()
        self.close()
        unpin(self.pin_dir)


class IdPool:
    """Ids 1, 2, ...: the lowest released id first, so maps sized for N live services never
    fill however often services and backends come and go."""

    def __init__(self, used: Iterable[int] = ()) -> None:
        self._used = set(used)
        self._next = max(self._used, default=0) + 1
        self._free = [n for n in range(1, self._next) if n not in self._used]
        heapq.heapify(self._free)

    def take(self) -> int:
        n = heapq.heappop(self._free) if self._free else self._next
        if n == self._next:
            self._next += 1
        self._used.add(n)
        return n

    def give(self, n: int) -> None:
        if n in self._used:
            self._used.discard(n)
            heapq.heappush(self._free, n)
