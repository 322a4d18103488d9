"""Load, pin, attach and fill the per-packet NodePort load balancer (nodeport.c).

    np = NodePort(pin_dir)                     # after SockLB and the datapath: it opens their maps
    np.attach("eth0", "10.251.0.12")           # tc ingress + egress of the underlay device
    np.sync([NpFrontend(...), ...])            # the whole desired set; writes only the diff
    np.close()                                 # agent exit: the programs keep balancing
    np.destroy()                               # detach and unpin

Pins: map_np_*, prog_np_* in the datapath's pin directory, beside the socket LB's. The filters
sit at tc priority 1 on the underlay device, before the datapath's own (native routing puts
from_netdev there): what is not a NodePort packet passes on with TC_ACT_UNSPEC.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from redirect_bpf import bpfsys, tc
from redirect_bpf import nodeport_structs as S
from redirect_bpf.maps import BpfMap, open_pinned_maps, release

SRC_DIR = Path(__file__).resolve().parent
SOURCE = SRC_DIR / "nodeport.c"
FILTER_NAME = "l7proxy-nodeport"
FILTER_PRIO = 1  # first on the device
PIN_NAMES = [f"map_{n}" for n in S.MAPS] + [f"prog_{n}" for n in S.PROGRAMS]


@dataclass(frozen=True, slots=True)
class NpFrontend:
    """One service as NodePort sees it: its VIP:port (the socket LB's key) and node port."""

    vip: str
    port: int
    proto: str  # "TCP" | "UDP"
    node_port: int = 0  # 0: only the VIP is balanced here
    dsr: bool = False


def unpin(pin_dir: Path) -> None:
    bpfsys.unlink_pins(pin_dir, PIN_NAMES)


CLOSED_IDLE_NS = 10 * 10**9  # Cilium's CT_CLOSE_TIMEOUT: a closed flow's entry lives 10 s


def gc_closed(maps: dict[str, BpfMap], now_ns: int, idle_ns: int = CLOSED_IDLE_NS) -> int:
    """Delete the np_ct entries of TCP flows the client closed (FIN or RST seen) and idle for
    `idle_ns` (now_ns and the entries' times are CLOCK_MONOTONIC, bpf_ktime_get_ns), with the
    np_rev entry that maps their answers back (SNAT and local DNAT; a DSR flow's sits on the
    backend's node and ages out there). Returns how many flows were removed. Open flows, and
    UDP, are left to LRU eviction."""
    config = maps["np_config"].get(S.u32(0))
    node_ip = config.node_ip if config is not None else 0
    ct_map, rev_map = maps["np_ct"], maps["np_rev"]
    removed = 0
    for key, ct in list(ct_map.items()):
        if not ct.flags & S.NP_CT_CLOSING or now_ns - ct.last_ns < idle_ns:
            continue
        again = ct_map.get(key)  # a SYN on the same tuple may have opened it again
        if again is None or not again.flags & S.NP_CT_CLOSING or again.last_ns != ct.last_ns:
            continue
        ct_map.delete(key)
        removed += 1
        if ct.flags & S.NP_CT_SNAT:
            rkey = S.Tuple(ct.backend_ip, node_ip, ct.backend_port, ct.nat_port, key.proto)
        elif ct.flags & S.NP_CT_LOCAL:
            rkey = S.Tuple(ct.backend_ip, key.saddr, ct.backend_port, key.sport, key.proto)
        else:
            continue
        rev = rev_map.get(rkey)
        if rev is not None and (rev.client_ip, rev.client_port) == (key.saddr, key.sport):
            rev_map.delete(rkey)
    return removed


class NodePort:
    def __init__(
        self, pin_dir: str | Path, cflags: Iterable[str] = (), *, rebuild: bool = False
    ) -> None:
        """`rebuild`: compile even over complete pins. The caller says so when the socket LB was
        compiled afresh: pinned programs would still hold the LB's old maps (the datapath
        starting over removes every pin, NodePort's too)."""
        self.pin_dir = Path(pin_dir)
        self.bpf = None
        self.device: str | None = None
        self.reused = not rebuild and bpfsys.pins_present(self.pin_dir, PIN_NAMES)
        if self.reused:
            try:
                self._open()
            except ValueError:  # an older layout: start over
                self.reused = False
        if not self.reused:
            unpin(self.pin_dir)
            self._compile(tuple(cflags))

    def _open(self) -> None:
        self.maps = {}  # close() works whatever the open raises
        self.maps = open_pinned_maps(self.pin_dir, S.MAPS)
        self.progs = {n: bpfsys.obj_get(self.pin_dir / f"prog_{n}") for n in S.PROGRAMS}

    def _compile(self, cflags: tuple[str, ...]) -> None:
        from bcc import BPF

        missing = [n for n in S.SHARED_MAPS if not (self.pin_dir / f"map_{n}").exists()]
        if missing:
            raise RuntimeError(f"NodePort needs the socket LB's and datapath's maps: {missing}")
        # The pin directory is a compile-time constant of the program (bcc opens pinned maps
        # by path at load time), given like the sizes.
        pin_dir = f'-DNP_PIN_DIR="{self.pin_dir}"'
        bpf = BPF(src_file=str(SOURCE).encode(), cflags=[f"-I{SRC_DIR}", pin_dir, *cflags])
        self.progs = {}
        for name in S.PROGRAMS:
            fn = bpf.load_func(name.encode(), BPF.SCHED_CLS)
            self.progs[name] = os.dup(fn.fd)
            bpfsys.obj_pin(fn.fd, self.pin_dir / f"prog_{name}")
        self.maps = {}
        for name, (key, value) in S.MAPS.items():
            fd = os.dup(bpf[name.encode()].get_fd())
            self.maps[name] = BpfMap(name, fd, key, value)
            bpfsys.obj_pin(fd, self.pin_dir / f"map_{name}")
        self.bpf = bpf

    # -- attach --------------------------------------------------------------------------------

    def set_node_ip(self, node_ip: str) -> None:
        """The NodePort address and SNAT source (the programs pass everything on until set)."""
        self.maps["np_config"].put(S.u32(0), S.Config(S.be32(node_ip), 0))

    def attach(self, device: str, node_ip: str) -> None:
        """The programs on the device's tc ingress and egress (replacing an earlier agent's),
        with `node_ip` as the NodePort address and SNAT source."""
        self.set_node_ip(node_ip)
        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=device)
            if not links:
                raise LookupError(f"no such interface: {device}")
            ifindex = links[0]
            with contextlib.suppress(NetlinkError):
                ipr.tc("add", "clsact", ifindex)  # kept if there (the device is shared)
            _del_ours(ipr, ifindex)
            for parent, prog in ((tc.INGRESS, "np_from_netdev"), (tc.EGRESS, "np_to_netdev")):
                ipr.tc("add-filter", "bpf", ifindex, ":1", fd=self.progs[prog], name=FILTER_NAME,
                       parent=parent, classid=1, direct_action=True, prio=FILTER_PRIO)  # fmt: skip
        self.device = device

    def detach(self) -> None:
        if self.device is None:
            return
        detach(self.device)
        self.device = None

    # -- frontends -----------------------------------------------------------------------------

    def sync(self, desired: Iterable[NpFrontend]) -> int:
        """Make np_frontends hold exactly the desired VIPs and node ports; returns map writes."""
        want: dict[bytes, bytes] = {}
        for f in desired:
            proto = S.PROTO[f.proto]
            value = bytes(S.Frontend(S.be32(f.vip), S.be16(f.port), S.NP_FRONTEND_DSR * f.dsr, 0))
            want[bytes(S.FrontendKey(S.be32(f.vip), S.be16(f.port), proto, 0))] = value
            if f.node_port:
                want[bytes(S.FrontendKey(0, S.be16(f.node_port), proto, 0))] = value
        m = self.maps["np_frontends"]
        have = {bytes(k): bytes(v) for k, v in m.items()}
        writes = 0
        for key, value in want.items():
            if have.get(key) != value:
                m.put_raw(key, value)
                writes += 1
        for key in have.keys() - want.keys():
            m.delete_raw(key)
            writes += 1
        return writes

    def reset_flows_to(self, gone: Iterable[tuple[str, str, int]]) -> int:
        """Mark the tracked flows to backends that were deleted ((proto, IP, port) each):
        their next TCP packet is answered with a reset instead of following the backend into
        nothing (a SYN or datagram on such a tuple picks a new backend anyway). One walk over
        np_ct; returns how many flows were marked."""
        wanted = {(S.PROTO[proto], S.be32(ip), S.be16(port)) for proto, ip, port in gone}
        if not wanted:
            return 0
        m = self.maps["np_ct"]
        marked = 0
        for key, ct in list(m.items()):
            if (key.proto, ct.backend_ip, ct.backend_port) not in wanted:
                continue
            if ct.flags & S.NP_CT_GONE:
                continue
            ct.flags |= S.NP_CT_GONE
            with contextlib.suppress(OSError):  # evicted meanwhile: nothing left to reset
                m.put(key, ct, bpfsys.BPF_EXIST)
                marked += 1
        return marked

    def gc(self, now_ns: int | None = None, idle_ns: int = CLOSED_IDLE_NS) -> int:
        """Remove the closed flows (gc_closed); returns how many."""
        return gc_closed(self.maps, time.monotonic_ns() if now_ns is None else now_ns, idle_ns)

    def frontends(self) -> int:
        return sum(1 for _ in self.maps["np_frontends"].keys())

    # -- life cycle ----------------------------------------------------------------------------

    def close(self) -> None:
        release(self.maps, self.progs.values(), self.bpf)
        self.maps, self.progs, self.bpf = {}, {}, None

    def destroy(self) -> None:
        self.detach()
        self.close()
        unpin(self.pin_dir)


def _del_ours(ipr: IPRoute, ifindex: int) -> None:
    for parent in (tc.INGRESS, tc.EGRESS):
        try:
            filters = ipr.get_filters(ifindex, parent=parent)
        except NetlinkError:
            continue
        for f in filters:
            opts = f.get_attr("TCA_OPTIONS")
            if opts is not None and (opts.get_attr("TCA_BPF_NAME") or "") == FILTER_NAME:
                with contextlib.suppress(NetlinkError):
                    ipr.tc("del-filter", "bpf", ifindex, f["handle"], parent=parent,
                           info=f["info"])  # fmt: skip


def detach(device: str) -> None:
    """Remove NodePort's filters from a device, nothing else there."""
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=device)
        if links:
            _del_ours(ipr, links[0])
