"""The node's links into the cluster: the VXLAN device (tunnel routing) or the routes through the
underlay (native routing), and the tc programs on them. Idempotent: a restarted agent finds its
device, filters and routes and keeps them (established cross-node flows never notice).

Tunnel routing (Cilium's cilium_vxlan):
    ip link add l7vxlan type vxlan dstport 4789 external nolearning; ip link set l7vxlan arp off up
    tc: ingress from_overlay (VNI -> identity, known nodes only), egress to_overlay (identity -> VNI)
    ip route replace CLUSTER_CIDR dev l7vxlan         every other node's pods, one route
Native routing:
    tc: ingress from_netdev on the underlay device (proxy redirects for remote sources)
    ip route replace CLUSTER_CIDR unreachable         nothing leaves for an unknown node...
    ip route replace POD_CIDR via UNDERLAY_IP         ...only for the nodes the cluster knows
Dual stack: the same for the cluster's IPv6 CIDR (routed into l7vxlan, or unreachable) and each
node's IPv6 pod CIDR. Tunnel: VXLAN over the IPv4 underlay carries the IPv6 inner packets. Native:
    ip -6 route replace POD_CIDR6 via UNDERLAY_IP6    the node's IPv6 address on the underlay
(an IPv6 route cannot take an IPv4 next hop: Linux refuses `via inet` for IPv6 with "IPv6 does
not support RTA_VIA attribute", and an IPv4 nexthop object for an IPv6 route likewise).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from redirect_bpf import tc

VXLAN_DEVICE = "l7vxlan"
VXLAN_PORT = 4789  # IANA's; Cilium uses 8472 (the Linux default) unless told otherwise
IFF_NOARP = 0x80
TUNNEL, NATIVE = "tunnel", "native"
ROUTINGS = (TUNNEL, NATIVE)


def ensure_vxlan(mtu: int = 1500) -> int:
    """The collect-metadata VXLAN device, up and without ARP (the programs set the tunnel key
    and from_overlay takes the inner frame as the host's); returns its ifindex."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=VXLAN_DEVICE)
        if not found:
            ipr.link(
                "add",
                ifname=VXLAN_DEVICE,
                kind="vxlan",
                vxlan_port=VXLAN_PORT,
                vxlan_collect_metadata=1,
                vxlan_learning=0,
            )
            found = ipr.link_lookup(ifname=VXLAN_DEVICE)
        idx = found[0]
        ipr.link("set", index=idx, flags=IFF_NOARP, change=IFF_NOARP)
        ipr.link("set", index=idx, mtu=mtu, state="up")
        return idx


def remove_vxlan() -> None:
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        for idx in ipr.link_lookup(ifname=VXLAN_DEVICE):
            ipr.link("del", index=idx)


def device_of(ip: str) -> str:
    """The interface that holds the address `ip` (the node's underlay device)."""
    with IPRoute() as ipr:
        for addr in ipr.get_addr(family=2):
            if addr.get_attr("IFA_ADDRESS") == ip:
                return ipr.get_links(addr["index"])[0].get_attr("IFLA_IFNAME")
    raise LookupError(f"no interface holds the underlay address {ip}: give --underlay-ip")


def attach_programs(ifname: str, *, ingress_fd: int, egress_fd: int | None = None) -> None:
    """tc programs on a cluster device, unless a restarted agent finds them there already."""
    if _has_filter(ifname, tc.INGRESS):
        return
    if egress_fd is None:
        tc.attach_ingress(ifname, ingress_fd=ingress_fd, name="l7proxy-node")
    else:
        tc.attach(ifname, ingress_fd=ingress_fd, egress_fd=egress_fd, name="l7proxy-node")


def _has_filter(ifname: str, parent: str) -> bool:
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            return False
        try:
            return any(
                f.get_attr("TCA_KIND") == "bpf" for f in ipr.get_filters(links[0], parent=parent)
            )
        except NetlinkError:
            return False


def _family(cidr: str) -> int:
    return socket.AF_INET6 if ":" in cidr else socket.AF_INET


def route_cluster(cluster_cidr: str, routing: str) -> None:
    """The catch-all for a cluster CIDR (either family): into the tunnel (to_overlay drops what
    no node owns) or unreachable (native: only known nodes' pod CIDRs have routes)."""
    family = _family(cluster_cidr)
    with IPRoute() as ipr:
        if routing == TUNNEL:
            idx = ipr.link_lookup(ifname=VXLAN_DEVICE)[0]
            ipr.route("replace", dst=cluster_cidr, oif=idx, family=family)
        else:
            ipr.route("replace", dst=cluster_cidr, type="unreachable", family=family)


def route_node(pod_cidr: str, gateway: str) -> None:
    """A node's pod CIDR via its underlay address of the same family."""
    with IPRoute() as ipr:
        ipr.route("replace", dst=pod_cidr, gateway=gateway, family=_family(pod_cidr))


def unroute_node(pod_cidr: str) -> None:
    with IPRoute() as ipr, contextlib.suppress(NetlinkError):
        ipr.route("del", dst=pod_cidr, family=_family(pod_cidr))


def router_ip(pod_cidr: str) -> str:
    """A node's router address: the first address after the network's (what its endpoints route
    via; l7proxy/agent/ipam.py's IPPool.router), IPv4 or IPv6."""
    return str(ipaddress.ip_network(pod_cidr).network_address + 1)
