"""The agent's kernel side of services: redirect_bpf.sock_lb behind the agent's calls (and, in
cluster mode, redirect_bpf.nodeport on the underlay device for NodePort and VIP traffic from
outside), or a null load balancer when BPF is off (the agent still stores services and shows
their backends).

Maglev tables are computed here (pure code in maglev.py) and cached by backend set: a table
takes ~20 ms in Python at M = 16381 (up to 16 backends) and 0.2-0.5 s at M = 131071 (66 and
more), and most refreshes change no backend set.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

from l7proxy.services import backends as resolver
from l7proxy.services import maglev, sock_terminate
from l7proxy.services.model import Backend, Service

log = logging.getLogger("l7proxy.services")

DEFAULT_CGROUP = "/sys/fs/cgroup/unified"  # the cgroup v2 root: the host and every pod
MAGLEV_CACHE = 256


class NullLb:
    name = "disabled"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def sync(self, plan) -> None:
        pass

    def terminate(self, targets) -> dict:
        return {}

    def stats(self) -> dict:
        return {}

    def gc(self) -> int:
        return 0

    def status(self) -> dict:
        return {"state": "disabled", "detail": f"no socket LB: {self.reason}"}

    def nodeport_missing(self) -> str:
        """Why this node does not serve NodePort/DSR ("" when it does)."""
        return f"no BPF load balancer on this node ({self.reason})"

    def close(self) -> None:
        pass


class KernelLb:
    name = "bpf"

    def __init__(self, pin_dir: Path, cgroup: str, node_ip: str = "") -> None:
        from redirect_bpf.sock_lb import SockLB

        self.lb = SockLB(pin_dir)
        self.cgroup = cgroup
        self.flags = self.lb.attach(cgroup)
        self._tables: OrderedDict[tuple[str, ...], tuple[int, ...]] = OrderedDict()
        self.nodeport = None
        self.nodeport_error = "" if node_ip else "no node IP (cluster mode only)"
        if node_ip:
            self._start_nodeport(pin_dir, node_ip)

    def _start_nodeport(self, pin_dir: Path, node_ip: str) -> None:
        """Per-packet LB on the device holding the node IP; without it the socket LB still
        works (NodePort is refused by nobody, only not answered)."""
        from redirect_bpf import overlay
        from redirect_bpf.nodeport import NodePort

        try:
            nodeport = NodePort(pin_dir, rebuild=not self.lb.reused)
        except Exception as exc:
            log.error("NodePort could not start: %s", exc)
            self.nodeport_error = f"failed to start: {exc}"
            return
        try:
            nodeport.attach(overlay.device_of(node_ip), node_ip)
        except Exception as exc:
            nodeport.close()
            log.error("NodePort could not attach: %s", exc)
            self.nodeport_error = f"failed to attach: {exc}"
            return
        self.nodeport, self.node_ip = nodeport, node_ip

    def _maglev(self, backends: tuple[Backend, ...]) -> tuple[int, ...]:
        """slot -> index into `backends` (in the given order), via the table over names."""
        names = tuple(sorted(b.key for b in backends))
        table = self._tables.get(names)
        if table is None:
            table = tuple(maglev.table(names))
            self._tables[names] = table
            if len(self._tables) > MAGLEV_CACHE:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(names)
        position = {b.key: i for i, b in enumerate(backends)}
        remap = [position[n] for n in names]
        return tuple(remap[i] for i in table)

    def sync(self, plan: list[tuple[Service, tuple[Backend, ...]]]) -> None:
        from redirect_bpf.sock_lb import LbService

        desired = []
        for svc, all_backends in plan:
            backends = resolver.serving(all_backends)  # terminating ones take no new flow
            desired.append(
                LbService(
                    svc.vip,
                    svc.port,
                    svc.protocol,
                    tuple((b.ip, b.port) for b in backends),
                    svc.affinity_timeout,
                    self._maglev(backends) if svc.algorithm == "maglev" and backends else None,
                )
            )
        self.lb.sync(desired)  # the backends and Maglev rows NodePort reads, before its frontends
        if self.nodeport is not None:
            from redirect_bpf.nodeport import NpFrontend

            self.nodeport.sync(
                NpFrontend(svc.vip, svc.port, svc.protocol, svc.node_port, svc.dsr)
                for svc, _ in plan
            )

    def terminate(self, targets: sock_terminate.Targets) -> dict[tuple[str, str, int], int]:
        """Reset the sockets this LB connected to backends that are gone (sock_terminate);
        how many per frontend (proto, VIP, port). NodePort's tracked TCP flows to them are
        marked so their next packet gets a reset (not counted: np_ct does not know the
        frontend a flow came through)."""
        if self.nodeport is not None:
            try:
                marked = self.nodeport.reset_flows_to(targets)
            except OSError as exc:  # best effort, as the sockets: such flows time out
                log.warning("services: marking NodePort flows to removed backends: %s", exc)
            else:
                if marked:
                    log.info("services: %d NodePort flows to removed backends reset", marked)
        return sock_terminate.destroy(targets, self.lb.translated_from)

    def stats(self) -> dict[tuple[str, int, str], tuple[int, int, int, int]]:
        """frontend (VIP, port, proto) -> (connects, datagrams, no backend, NodePort flows),
        from the kernel."""
        return self.lb.stats()

    def nodeport_missing(self) -> str:
        """Why this node does not serve NodePort/DSR ("" when it does)."""
        return "" if self.nodeport is not None else self.nodeport_error

    def gc(self) -> int:
        """NodePort's closed flows removed (redirect_bpf/nodeport.py gc_closed)."""
        return self.nodeport.gc() if self.nodeport is not None else 0

    def status(self) -> dict:
        from redirect_bpf.sock_lb import BPF_F_PREORDER

        preorder = "preorder" if self.flags & BPF_F_PREORDER else "attach order"
        if self.nodeport is not None:
            nodeport = f"NodePort on {self.nodeport.device} ({self.node_ip})"
        else:
            nodeport = f"no NodePort: {self.nodeport_error}"
        return {
            "state": "ok",
            "detail": f"socket LB on {self.cgroup} ({preorder}), "
            f"{len(self.lb.services())} frontends, {nodeport}, pins {self.lb.pin_dir}",
        }

    def close(self) -> None:
        self.lb.close()  # attached programs keep translating while the agent is away
        if self.nodeport is not None:
            self.nodeport.close()


def make_lb(datapath, cgroup: str, node_ip: str = ""):
    if getattr(datapath, "name", "") != "bpf":
        return NullLb(getattr(datapath, "reason", "the BPF datapath is off"))
    if not cgroup:
        return NullLb("turned off (--sock-lb-cgroup '')")
    try:
        # The datapath's own pin directory (the LB's pins have names of their own there): what
        # removes the datapath's pins removes the LB's links too, and with them the attachments.
        return KernelLb(Path(datapath.pin_dir), cgroup, node_ip)
    except Exception as exc:  # the agent runs without socket LB rather than not at all
        log.error("socket LB could not start: %s", exc)
        return NullLb(f"failed to start: {exc}")
