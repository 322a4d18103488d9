"""Host-scope IP allocation for endpoints.

The pool is one CIDR owned by this node. Its first address is the router: every endpoint's
default route points at it, and the host side of every endpoint veth carries it as a /32, so the
kernel answers ARP for it on each veth and forwards between endpoints by their /32 host routes
(the shape Cilium uses with its cilium_host router address).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


class PoolExhausted(Exception):
    pass


# The agent's IPv6 pool when `--pool6 default` asks for dual stack without naming one: a ULA
# prefix (RFC 4193, fd00::/8) that mirrors the IPv4 default 10.200.0.0/16.
DEFAULT_POOL6 = "fd00:10:200::/64"


class IPPool:
    def __init__(self, cidr: str, version: int = 4) -> None:
        self.network = ipaddress.ip_network(cidr, strict=False)
        if version == 4 and (self.network.version != 4 or self.network.prefixlen > 30):
            raise ValueError(f"pool {cidr}: need an IPv4 network of /30 or larger")
        if version == 6 and (self.network.version != 6 or self.network.prefixlen > 126):
            raise ValueError(f"pool {cidr}: need an IPv6 network of /126 or larger")
        self.router = str(self.network.network_address + 1)

    def allocate(self, used: Iterable[str]) -> str:
        """The lowest free address after the router (deterministic, so tests can predict it)."""
        taken = {ipaddress.ip_address(ip) for ip in used if ip}  # "": no address of this family
        taken.add(ipaddress.ip_address(self.router))
        for host in self.network.hosts():
            if host not in taken:
                return str(host)
        raise PoolExhausted(f"no free address left in {self.network}")

    def validate(self, ip: str, used: Iterable[str]) -> str:
        """Check an address the user asked for: not the router, not in use."""
        addr = ipaddress.ip_address(ip)
        if str(addr) == self.router:
            raise ValueError(f"{ip} is the router address of this node")
        if str(addr) in set(used):
            raise ValueError(f"{ip} is already used by another endpoint")
        return str(addr)
