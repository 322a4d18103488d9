"""Linux socket plumbing for the transparent modes, in one place: IP_TRANSPARENT listeners,
SO_MARK on upstream sockets, and the original destination of an accepted connection.

Node mode: the tc program hands the client's packets to a listener with bpf_sk_assign, so the
accepted socket's local address *is* the original destination (`getsockname`). Its upstream
socket carries SO_MARK = MARK_FROM_PROXY | source identity, so the destination's ingress check
sees the real source identity and the datapath never redirects the proxy's own traffic.

Sidecar mode: cgroup/connect4 rewrote the client's connect() to 127.0.0.1:sidecar_port and kept
the original destination in a pinned map keyed by the connection (namespace cookie, client
address, sidecar port); `SidecarDestination` reads (and removes) it. `original_dst_nat` covers
iptables REDIRECT setups (SO_ORIGINAL_DST).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from l7proxy.context import OriginalDestination

# The proxy marks are defined once, next to their C twins in redirect_bpf/datapath.h.
from redirect_bpf.structs import MARK_FROM_PROXY, MARK_IDENTITY_MASK  # noqa: F401

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_ORIGINAL_DST = 80
IP_RECVORIGDSTADDR = 20  # also IP_ORIGDSTADDR, the cmsg type it delivers
IPV6_RECVORIGDSTADDR = 74  # also IPV6_ORIGDSTADDR
SO_NETNS_COOKIE = 71


def set_transparent(sock: socket.socket) -> None:
    """Needed by a node-mode listener: its accepted sockets answer from the original destination."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def proxy_mark(source_identity: int) -> int:
    if not 0 <= source_identity <= MARK_IDENTITY_MASK:
        raise ValueError(f"identity {source_identity} does not fit the 24-bit mark")
    return MARK_FROM_PROXY | source_identity


def set_mark(sock: socket.socket, mark: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)


def mark_upstream(sock: socket.socket, source_identity: int) -> None:
    """Before connect(): the datapath reads the source identity back from the mark."""
    set_mark(sock, proxy_mark(source_identity))


def transparent_listener(
    port: int = 0, host: str = "127.0.0.1", backlog: int = 1024
) -> socket.socket:
    """A TCP listener the datapath can assign redirected connections to (needs CAP_NET_ADMIN).
    The tc program looks listeners up on 127.0.0.1:port, which also finds 0.0.0.0:port; IPv6
    flows on [::1]:port (an IPv6-only socket beside the IPv4 one, on the same port)."""
    sock = socket.socket(family_of(host), socket.SOCK_STREAM)
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        set_transparent(sock)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def transparent_udp(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """A UDP socket the datapath can assign redirected datagrams to; each datagram's original
    destination arrives as an IP_ORIGDSTADDR cmsg (see recv_with_original_dst). On "::1" an
    IPv6-only socket (IPV6_ORIGDSTADDR), which the tc program looks up for IPv6 datagrams."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        set_transparent(sock)
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        else:
            sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def recv_with_original_dst(sock: socket.socket, size: int):
    """(data, source (ip, port), original destination (ip, port) or None) of one datagram, on
    an IPv4 or an IPv6 socket of transparent_udp()."""
    data, ancillary, _flags, source = sock.recvmsg(size, 64)
    for level, kind, raw in ancillary:
        if level == socket.SOL_IP and kind == IP_RECVORIGDSTADDR and len(raw) >= 8:
            # struct sockaddr_in: family, port (network order), address
            return data, source, (socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big"))
        if level == socket.IPPROTO_IPV6 and kind == IPV6_RECVORIGDSTADDR and len(raw) >= 24:
            # struct sockaddr_in6: family, port (network order), flow info, address, scope
            ip = socket.inet_ntop(socket.AF_INET6, raw[8:24])
            return data, source[:2], (ip, int.from_bytes(raw[2:4], "big"))
    return data, source[:2], None


def reply_socket(source: tuple[str, int]) -> socket.socket:
    """A UDP socket that sends from `source` (the original destination, not a local address):
    the DNS proxy's answers must come from the server the client asked."""
    sock = socket.socket(family_of(source[0]), socket.SOCK_DGRAM)
    try:
        set_transparent(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(source)
    except OSError:
        sock.close()
        raise
    return sock


def original_dst_transparent(sock: socket.socket) -> tuple[str, int]:
    host, port = sock.getsockname()[:2]
    return host, port


def original_dst_nat(sock: socket.socket) -> tuple[str, int]:
    """SO_ORIGINAL_DST of a connection NATed by iptables REDIRECT/DNAT."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def original_dst_nat6(sock: socket.socket) -> tuple[str, int]:
    """IP6T_SO_ORIGINAL_DST (SOL_IPV6, 80): the original IPv6 destination, as ip6tables
    REDIRECT and the sidecar's getsockopt hook answer it (an IPv4 one as ::ffff:a.b.c.d)."""
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    (port,) = struct.unpack_from("!H", raw, 2)
    return str(ipaddress.IPv6Address(raw[8:24])), port


def netns_cookie(sock) -> int:
    """The kernel's cookie of the network namespace a socket lives in (Linux >= 5.14), the same
    number bpf_get_netns_cookie gives a BPF program for that socket."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_NETNS_COOKIE, 8))[0]


@dataclass(frozen=True, slots=True)
class SidecarOrigin:
    ip: str
    port: int
    source_identity: int
    destination_identity: int


class SidecarMap:
    """The pinned sidecar_by_addr map of a node's datapath, read by the sidecar proxy."""

    def __init__(self, pin_dir: str | Path):
        from redirect_bpf import bpfsys
        from redirect_bpf.maps import BpfMap
        from redirect_bpf.structs import SidecarAddr, SidecarOrig

        self._key = SidecarAddr
        self._map = BpfMap(
            "sidecar_by_addr",
            bpfsys.obj_get(Path(pin_dir) / "map_sidecar_by_addr"),
            SidecarAddr,
            SidecarOrig,
        )

    def pop(self, conn) -> SidecarOrigin | None:
        """The original destination of an accepted sidecar connection (a socket, or asyncio's
        wrapper of one), removed from the map: one lookup per connection."""
        key = self.key_of(conn)
        value = self._map.get(key)
        if value is None:
            return None
        self._map.delete(key)
        if any(value.daddr6):  # a native IPv6 destination (connect6)
            ip = str(ipaddress.IPv6Address(bytes(value.daddr6)))
        else:
            ip = str(ipaddress.IPv4Address(socket.ntohl(value.daddr)))
        return SidecarOrigin(ip, socket.ntohs(value.dport), value.src_identity, value.dst_identity)

    def key_of(self, conn):
        """The connection as the sock_ops program keyed it: the namespace the listener (and the
        client) live in, the client's address and the sidecar's port."""
        client_ip, client_port = conn.getpeername()[:2]
        return self._key(
            netns=netns_cookie(conn),
            ip=int.from_bytes(socket.inet_aton(client_ip), "little"),
            port=socket.htons(client_port),
            proxy_port=socket.htons(conn.getsockname()[1]),
        )

    def close(self) -> None:
        self._map.close()


class TransparentDestination:
    """Node mode resolver for ConnContext: the accepted socket's local address."""

    def __call__(self, transport) -> OriginalDestination:
        host, port = transport.get_extra_info("sockname")[:2]
        return OriginalDestination(host, port)


class SidecarDestination:
    """Sidecar mode resolver: the original destination the connect4 hook stored."""

    def __init__(self, pin_dir: str | Path):
        self.map = SidecarMap(pin_dir)

    def __call__(self, transport) -> OriginalDestination:
        origin = self.map.pop(transport.get_extra_info("socket"))
        if origin is None:
            host, port = transport.get_extra_info("peername")[:2]
            raise LookupError(f"no original destination for {host}:{port}")
        return OriginalDestination(origin.ip, origin.port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing is bound to on `host` right now, picked by the kernel. Another process
    may take it before the caller binds it, so use it for a child started at once (the tests,
    the bench and the demo start their peers with it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
