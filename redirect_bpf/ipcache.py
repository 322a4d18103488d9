"""The ipcache map: CIDR -> security identity (and, for other nodes' addresses, the underlay IP
of the node that owns them), an LPM trie the programs look peers and tunnel endpoints up in.

Two writers share it. The agent syncs its own view ({cidr: identity}: local endpoints, CIDR
identities) with sync(); the cluster sink (redirect_bpf/cluster_sink.py) owns every entry with
a tunnel endpoint. sync() leaves those alone: another node's addresses (its pods, its own IPs as
remote-node) are what the cluster says they are, also when a CIDR rule names the same /32.

IPv6 prefixes live in the twin map ipcache6 (128-bit keys, same values): key() picks the key type
by the prefix's family, and the caller passes the map of that family (map_for() names it). An
IPv6 address the ipcache does not know is world-ipv6 (10), an IPv4 one world (2).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

from redirect_bpf import structs
from redirect_bpf.bpfsys import BPF_NOEXIST
from redirect_bpf.structs import Addr6, Ipcache6Key, IpcacheKey, IpcacheValue


def be32(ip: str) -> int:
    """An IPv4 address as the u32 the maps hold in network byte order."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def ip_of(addr_be: int) -> str:
    return socket.inet_ntoa(addr_be.to_bytes(4, "little"))


def addr6(ip: str) -> Addr6:
    """An IPv6 address as the maps hold it (16 bytes, network order)."""
    return Addr6.from_buffer_copy(ipaddress.IPv6Address(ip).packed)


def ip6_of(addr: Addr6) -> str:
    return str(ipaddress.IPv6Address(bytes(addr)))


def family(cidr: str) -> int:
    """4 or 6: the family of a prefix or an address."""
    return 6 if ":" in cidr else 4


def map_for(maps, cidr: str):
    """The ipcache map that holds this prefix: maps["ipcache"] or maps["ipcache6"]."""
    return maps["ipcache6"] if family(cidr) == 6 else maps["ipcache"]


def key(cidr: str) -> IpcacheKey | Ipcache6Key:
    net = ipaddress.ip_network(cidr, strict=False)
    if net.version == 6:
        return Ipcache6Key(prefixlen=net.prefixlen, addr=addr6(str(net.network_address)))
    return IpcacheKey(prefixlen=net.prefixlen, addr=be32(str(net.network_address)))


def cidr_of(k: IpcacheKey | Ipcache6Key) -> str:
    if isinstance(k, Ipcache6Key):
        return f"{ip6_of(k.addr)}/{k.prefixlen}"
    return f"{ip_of(k.addr)}/{k.prefixlen}"


def upsert(ipcache, cidr: str, identity: int, tunnel_endpoint: str | None = None) -> None:
    tunnel = be32(tunnel_endpoint) if tunnel_endpoint else 0
    ipcache.put(key(cidr), IpcacheValue(identity=identity, tunnel_endpoint=tunnel))


def delete(ipcache, cidr: str) -> bool:
    return ipcache.delete(key(cidr))


def lookup(ipcache, ip: str) -> int:
    if family(ip) == 6:
        value = ipcache.get(key(f"{ip}/128"))
        return value.identity if value else structs.IDENTITY_WORLD_IPV6
    value = ipcache.get(key(f"{ip}/32"))
    return value.identity if value else structs.IDENTITY_WORLD


def entry(ipcache, cidr: str) -> tuple[int, str | None] | None:
    """(identity, tunnel endpoint or None) of exactly this CIDR, or None."""
    value = ipcache.get(key(cidr))
    if value is None:
        return None
    return value.identity, ip_of(value.tunnel_endpoint) if value.tunnel_endpoint else None


def remote_entries(ipcache) -> dict[str, tuple[int, str]]:
    """{cidr: (identity, tunnel endpoint)} of every entry the cluster sink owns."""
    return {
        cidr_of(k): (v.identity, ip_of(v.tunnel_endpoint))
        for k, v in ipcache.items()
        if v.tunnel_endpoint
    }


def sync(ipcache, entries: Mapping[str, int]) -> int:
    """Make the local part of the ipcache equal to {cidr: identity}; returns the number of
    changes. Entries with a tunnel endpoint are the cluster sink's and stay as they are. The
    entries are all of the map's family (Datapath.ipcache_sync splits them)."""
    key_type = ipcache.key_type
    want = {bytes(key(c)): i for c, i in entries.items()}
    have = {bytes(k): (v.identity, v.tunnel_endpoint) for k, v in ipcache.items()}
    changes = 0
    for kb, identity in want.items():
        old = have.get(kb)
        if old is None:
            # only if still absent: the sink (another thread) may have put the same address
            # with its tunnel endpoint since `have` was read, and that entry must win
            try:
                ipcache.put(
                    key_type.from_buffer_copy(kb), IpcacheValue(identity=identity), BPF_NOEXIST
                )
            except FileExistsError:
                continue
            changes += 1
        elif old[0] != identity and not old[1]:
            ipcache.put(key_type.from_buffer_copy(kb), IpcacheValue(identity=identity))
            changes += 1
    for kb in have.keys() - want.keys():
        if have[kb][1]:
            continue  # the cluster sink's: it deletes it when the node or pod goes
        ipcache.delete(key_type.from_buffer_copy(kb))
        changes += 1
    return changes
