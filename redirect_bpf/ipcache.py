"""The ipcache map: CIDR -> security identity, an LPM trie the programs look peers up in."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping

from redirect_bpf import structs
from redirect_bpf.structs import IpcacheKey, IpcacheValue


def be32(ip: str) -> int:
    """An IPv4 address as the u32 the maps hold in network byte order."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def key(cidr: str) -> IpcacheKey:
    net = ipaddress.IPv4Network(cidr, strict=False)
    return IpcacheKey(prefixlen=net.prefixlen, addr=be32(str(net.network_address)))


def upsert(ipcache, cidr: str, identity: int) -> None:
    ipcache.put(key(cidr), IpcacheValue(identity=identity))


def delete(ipcache, cidr: str) -> bool:
    return ipcache.delete(key(cidr))


def lookup(ipcache, ip: str) -> int:
    value = ipcache.get(key(f"{ip}/32"))
    return value.identity if value else structs.IDENTITY_WORLD


def sync(ipcache, entries: Mapping[str, int]) -> int:
    """Make the ipcache equal to {cidr: identity}; returns the number of changes."""
    want = {bytes(key(c)): i for c, i in entries.items()}
    have = {bytes(k): v.identity for k, v in ipcache.items()}
    changes = 0
    for kb, identity in want.items():
        if have.get(kb) != identity:
            ipcache.put(IpcacheKey.from_buffer_copy(kb), IpcacheValue(identity=identity))
            changes += 1
    for kb in have.keys() - want.keys():
        ipcache.delete(IpcacheKey.from_buffer_copy(kb))
        changes += 1
    return changes
