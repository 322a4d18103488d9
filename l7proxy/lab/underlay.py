"""The lab's underlay: a bridge in the root namespace (the etcd listens on its address) and one
"host" network namespace per node, joined to it by a veth. The underlay MTU leaves room for the
VXLAN header (50 bytes) under a 1500-byte pod MTU, like a cloud network with jumbo frames.

    l7lab0 10.251.0.1/24 ── l7lab-h1 ═ eth0 10.251.0.11/24 (netns l7lab-node1)
                         ── l7lab-h2 ═ eth0 10.251.0.12/24 (netns l7lab-node2) ...
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import subprocess
from pathlib import Path

from pyroute2 import IPRoute, NetNS, netns
from pyroute2.netlink.exceptions import NetlinkError

from l7proxy import proc
from l7proxy.agent.netdev import IFA_F_NODAD
from l7proxy.lab import state

UNDERLAY_MTU = 9000
NETNS_DIR = Path("/var/run/netns")


def ensure_bridge() -> None:
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=state.BRIDGE):
            ipr.link("add", ifname=state.BRIDGE, kind="bridge")
        idx = ipr.link_lookup(ifname=state.BRIDGE)[0]
        prefix = ipaddress.IPv4Network(state.UNDERLAY).prefixlen
        with contextlib.suppress(NetlinkError):  # EEXIST on a second lab up
            ipr.addr("add", index=idx, address=state.BRIDGE_IP, prefixlen=prefix)
        prefix6 = ipaddress.IPv6Network(state.UNDERLAY6).prefixlen
        with contextlib.suppress(NetlinkError):
            ipr.addr(
                "add", index=idx, address=state.BRIDGE_IP6, prefixlen=prefix6, flags=IFA_F_NODAD
            )
        ipr.link("set", index=idx, mtu=UNDERLAY_MTU, state="up")


def add_host(netns_name: str, host_link: str, ip: str, ip6: str = "") -> None:
    """A node's host namespace with eth0 on the bridge (IPv4, and IPv6 if ip6 is given)."""
    netns.create(netns_name)
    prefix = ipaddress.IPv4Network(state.UNDERLAY).prefixlen
    with IPRoute() as ipr:
        peer = "t" + host_link[1:]
        ipr.link(
            "add", ifname=host_link, kind="veth", peer={"ifname": peer, "net_ns_fd": netns_name}
        )
        idx = ipr.link_lookup(ifname=host_link)[0]
        bridge = ipr.link_lookup(ifname=state.BRIDGE)[0]
        ipr.link("set", index=idx, master=bridge, mtu=UNDERLAY_MTU, state="up")
    with NetNS(netns_name) as ns:
        (eth,) = ns.link_lookup(ifname=peer)
        ns.link("set", index=eth, ifname="eth0", mtu=UNDERLAY_MTU)
        ns.addr("add", index=eth, address=ip, prefixlen=prefix)
        if ip6:
            prefix6 = ipaddress.IPv6Network(state.UNDERLAY6).prefixlen
            ns.addr("add", index=eth, address=ip6, prefixlen=prefix6, flags=IFA_F_NODAD)
        ns.link("set", index=eth, state="up")
        (lo,) = ns.link_lookup(ifname="lo")
        ns.link("set", index=lo, state="up")


def leftover_namespaces() -> list[str]:
    """Every namespace a lab made: the node hosts and the agents' endpoint namespaces."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(state.NAME_PREFIX))


def remove_all() -> list[str]:
    """Remove every lab namespace, link and the bridge; returns what was removed."""
    removed = []
    for name in leftover_namespaces():
        stopped = stop_processes_in(name)
        if stopped:
            removed.append(f"stopped {stopped} process(es) in netns {name}")
        with contextlib.suppress(OSError):
            netns.remove(name)
            removed.append(f"netns {name}")
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name == state.BRIDGE or name.startswith("l7lab-"):
                with contextlib.suppress(NetlinkError):
                    ipr.link("del", index=link["index"])
                    removed.append(f"link {name}")
    return removed


def stop_processes_in(name: str, grace_s: float = 2.0) -> int:
    """Stop what still runs inside a lab namespace (servers a user started with `endpoint exec`,
    a lab agent whose pidfile was lost): removing the namespace's name would leave them running
    in an unreachable namespace. SIGTERM, then SIGKILL after `grace_s`. Returns how many."""
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True, check=False)
    pids = [int(p) for p in out.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    proc.stop(pids, grace_s)
    return len(pids)
