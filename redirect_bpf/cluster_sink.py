"""The cluster layer's sink (l7proxy/cluster/sink.py's ClusterSink) over this node's BPF maps and
routes: what the other nodes and their pods are.

    sink = ClusterDatapath(dp, routing="tunnel", cluster_cidr="10.252.0.0/16")
    sink.setup()                                      # VXLAN device or underlay hook, routes
    sink.node_up("node2", "10.251.0.12", "10.252.2.0/24", "fd00:10:252:2::/64")
    sink.ipcache_set("10.252.2.7/32", 4711, "10.251.0.12")
    sink.ipcache_set("fd00:10:252:2::2/128", 4711, "10.251.0.12")   # ipcache6, same endpoint

Per node: the nodes map (only these underlay IPs may send VXLAN), the ipcache entries for its
underlay IP and router address (remote-node) and its pod CIDR (world, unless a pod is known),
each with the node's underlay IP as tunnel endpoint, and in native routing a route to its pod
CIDR. A dual-stack node's IPv6 pod CIDR and router address go into ipcache6 the same way, with the
same IPv4 tunnel endpoint (VXLAN runs over the IPv4 underlay for both inner families), and in
native routing its IPv6 pod CIDR is routed via the node's IPv6 underlay address. Nothing is kept in memory: a restarted agent finds the node by its map entry (node_id is
a hash of the name), so node_down works for nodes an earlier agent learnt.
"""

from __future__ import annotations

import ipaddress
import zlib

from redirect_bpf import ipcache, overlay, structs
from redirect_bpf.structs import NodeInfo


def node_id(name: str) -> int:
    return zlib.crc32(name.encode()) or 1


class ClusterDatapath:
    def __init__(
        self,
        datapath,
        *,
        routing: str,
        cluster_cidr: str,
        underlay_ip: str = "",
        cluster_cidr6: str = "",
    ):
        if routing not in overlay.ROUTINGS:
            raise ValueError(f"routing {routing!r}: give one of {', '.join(overlay.ROUTINGS)}")
        self.dp = datapath
        self.routing = routing
        self.cluster_cidr = str(ipaddress.IPv4Network(cluster_cidr))
        self.cluster_cidr6 = str(ipaddress.IPv6Network(cluster_cidr6)) if cluster_cidr6 else ""
        self.underlay_ip = underlay_ip
        self._ipcache = datapath.maps["ipcache"]
        self._ipcache6 = datapath.maps["ipcache6"]
        self._nodes = datapath.maps["nodes"]

    def setup(self, mtu: int = 1500) -> None:
        progs = self.dp.prog_fds
        if self.routing == overlay.TUNNEL:
            overlay.ensure_vxlan(mtu)
            overlay.attach_programs(
                overlay.VXLAN_DEVICE,
                ingress_fd=progs["from_overlay"],
                egress_fd=progs["to_overlay"],
            )
        elif self.underlay_ip:
            overlay.attach_programs(
                overlay.device_of(self.underlay_ip), ingress_fd=progs["from_netdev"]
            )
        overlay.route_cluster(self.cluster_cidr, self.routing)
        if self.cluster_cidr6:
            overlay.route_cluster(self.cluster_cidr6, self.routing)

    # -- the sink ----------------------------------------------------------------------------

    def node_up(
        self,
        name: str,
        underlay_ip: str,
        pod_cidr: str,
        pod_cidr6: str = "",
        underlay_ip6: str = "",
    ) -> None:
        old = self._underlay_of(name)
        if old is not None and old != underlay_ip:
            self.node_down(name)  # moved: its old address may send nothing more
        self._nodes.put(structs.u32(ipcache.be32(underlay_ip)), NodeInfo(node_id=node_id(name)))
        remote = structs.IDENTITY_REMOTE_NODE
        ipcache.upsert(self._ipcache, f"{underlay_ip}/32", remote, underlay_ip)
        self._pod_cidr_up(pod_cidr, underlay_ip, underlay_ip)
        if pod_cidr6:
            self._pod_cidr_up(pod_cidr6, underlay_ip, underlay_ip6)

    def _pod_cidr_up(self, pod_cidr: str, underlay_ip: str, gateway: str) -> None:
        """A node's pod CIDR of one family: its router address (remote-node), the CIDR itself
        (world of that family, unless a pod is known), each with the node's IPv4 underlay
        address as tunnel endpoint, and, natively routed, the route via `gateway` (the node's
        underlay address of that family; none: no route, its pods stay unreachable)."""
        ipc = ipcache.map_for(self.dp.maps, pod_cidr)
        host = "/128" if ipcache.family(pod_cidr) == 6 else "/32"
        world = structs.IDENTITY_WORLD_IPV6 if host == "/128" else structs.IDENTITY_WORLD
        router = overlay.router_ip(pod_cidr)
        ipcache.upsert(ipc, f"{router}{host}", structs.IDENTITY_REMOTE_NODE, underlay_ip)
        known = ipcache.entry(ipc, pod_cidr)
        if known is None or known[1] != underlay_ip:
            ipcache.upsert(ipc, pod_cidr, world, underlay_ip)
        if self.routing == overlay.NATIVE and gateway:
            overlay.route_node(pod_cidr, gateway)

    def node_down(self, name: str) -> None:
        underlay_ip = self._underlay_of(name)
        if underlay_ip is None:
            return
        for ipc in (self._ipcache, self._ipcache6):
            for cidr, (_identity, tunnel) in ipcache.remote_entries(ipc).items():
                if tunnel != underlay_ip:
                    continue
                ipcache.delete(ipc, cidr)
                host = cidr.endswith("/32") or cidr.endswith("/128")
                if self.routing == overlay.NATIVE and not host:
                    overlay.unroute_node(cidr)
        self._nodes.delete(structs.u32(ipcache.be32(underlay_ip)))

    def ipcache_set(self, cidr: str, identity: int, node_underlay_ip: str | None) -> None:
        ipc = ipcache.map_for(self.dp.maps, cidr)
        if node_underlay_ip is None:
            known = ipcache.entry(ipc, cidr)
            node_underlay_ip = known[1] if known else None
        ipcache.upsert(ipc, cidr, identity, node_underlay_ip)

    def ipcache_delete(self, cidr: str) -> None:
        ipcache.delete(ipcache.map_for(self.dp.maps, cidr), cidr)

    # -- what the maps say -------------------------------------------------------------------

    def nodes(self) -> dict[str, int]:
        """{underlay IP: node_id} of every node allowed to send VXLAN."""
        return {ipcache.ip_of(k.value): v.node_id for k, v in self._nodes.items()}

    def _underlay_of(self, name: str) -> str | None:
        wanted = node_id(name)
        for ip, nid in self.nodes().items():
            if nid == wanted:
                return ip
        return None
