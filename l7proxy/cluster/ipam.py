"""Host-scope IPAM: each node leases one pod CIDR from the cluster CIDR through etcd.

A pod CIDR key holds the node's name and sits on the node's lease, so a node that is gone for
longer than its lease TTL frees its CIDR. Pod addresses inside the CIDR are then allocated by
the node alone (l7proxy/agent/ipam.py), with no etcd round trip per pod.
"""

from __future__ import annotations

import functools
import ipaddress
import socket

from l7proxy.cluster import keys
from l7proxy.cluster.kvstore import KVStore, absent, put
from l7proxy.platform import family_of


class ClusterCidrFull(Exception):
    pass


def in_cluster(ip: str, *cluster_cidrs: str) -> bool:
    """Is ip a pod address of the cluster (in the IPv4 or the IPv6 cluster CIDR; "" = none)?

    The node proxy asks this for every new connection in cluster mode. Parsing the CIDRs and
    the address into ipaddress objects each time cost 11 us for an IPv4 address and 21 us for
    an IPv6 one; the CIDRs are parsed once and the address is compared as an integer (~1 us)."""
    family = family_of(ip)
    try:
        value = int.from_bytes(socket.inet_pton(family, ip), "big")
    except OSError:  # not a plain literal (a scope id, say): ipaddress decides, or refuses
        addr = ipaddress.ip_address(ip)
        return any(c and addr in ipaddress.ip_network(c) for c in cluster_cidrs)
    for cidr in cluster_cidrs:
        if cidr:
            net_family, network, mask = _network(cidr)
            if net_family == family and value & mask == network:
                return True
    return False


@functools.lru_cache(maxsize=8)  # a node has one or two cluster CIDRs
def _network(cidr: str) -> tuple[int, int, int]:
    """(address family, network address, netmask) of a CIDR, as integers."""
    net = ipaddress.ip_network(cidr)
    family = socket.AF_INET6 if net.version == 6 else socket.AF_INET
    return family, int(net.network_address), int(net.netmask)


def subnets(cluster_cidr: str, mask_size: int, version: int = 4) -> list[str]:
    """The node CIDRs of a cluster CIDR: IPv4 (--cluster-cidr) or IPv6 (--cluster-cidr6)."""
    six = "6" if version == 6 else ""
    longest = 126 if version == 6 else 30
    try:
        net = ipaddress.ip_network(cluster_cidr, strict=True)
    except ValueError as exc:
        raise ValueError(f"--cluster-cidr{six} {cluster_cidr}: {exc}") from None
    if net.version != version or not net.prefixlen <= mask_size <= longest:
        raise ValueError(
            f"--cluster-cidr{six} {cluster_cidr} with --node-cidr-mask-size{six} {mask_size}: "
            f"need an IPv{version} network no longer than /{mask_size}, and a mask size of at "
            f"most {longest}"
        )
    if 2 ** (mask_size - net.prefixlen) > 65536:
        raise ValueError(
            f"--node-cidr-mask-size{six} {mask_size}: too many node CIDRs (over 65536); give a smaller one or a longer cluster CIDR"
        )
    return [str(s) for s in net.subnets(new_prefix=mask_size)]


async def lease_pod_cidr(
    kv: KVStore,
    node: str,
    cluster_cidr: str,
    mask_size: int,
    lease: int,
    preferred: str | None,
    version: int = 4,
) -> str:
    """This node's pod CIDR (of the cluster CIDR's family): the one it holds already, else
    `preferred` (what it had before a restart) if free, else the first free one. Each claim is
    a create-only transaction. Both families' CIDRs share the key prefix."""
    candidates = subnets(cluster_cidr, mask_size, version)
    items, _ = await kv.list(keys.PODCIDRS)
    owner = {i.key[len(keys.PODCIDRS) :].replace("_", "/"): i.value for i in items}
    mine = [c for c, n in owner.items() if n == node and c in candidates]
    if mine:
        cidr = mine[0]
        await kv.put(keys.podcidr(cidr), node, lease)  # re-attach it to this lease
        return cidr
    order = ([preferred] if preferred in candidates else []) + candidates
    for cidr in order:
        if cidr in owner:
            continue
        if await kv.txn([absent(keys.podcidr(cidr))], [put(keys.podcidr(cidr), node, lease)]):
            return cidr
    raise ClusterCidrFull(f"no free /{mask_size} left in {cluster_cidr} for node {node}")
