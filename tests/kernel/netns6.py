"""IPv6 and dual-stack endpoints for the kernel tests: namespaces with a veth to the host, the
sockets, and ICMPv6 echo, always removed afterwards (the IPv4-only helpers are in netns.py)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from l7proxy.agent.netdev import enable_forwarding
from tests.kernel.netns import EchoServer, InNetns, sh, sock_in, tcp_ok, udp_ok

# Test pods take /64s of this ULA prefix (fd00:250:<n>::/64): host ::1, pod ::2.
TEST_PREFIX = "fd00:250"


@dataclass(frozen=True, slots=True)
class Pod6(InNetns):
    netns: str
    host_if: str
    pod_ip: str | None  # IPv4, None for an IPv6-only pod
    host_ip: str | None
    pod_ip6: str
    host_ip6: str


def free_subnets(n: int) -> list[int]:
    """n values of <n> in fd00:250:<n>::/64 that no interface on this host uses."""
    out = sh("ip", "-6", "-o", "addr", "show").stdout
    used = {w.split(":")[2] for w in out.split() if w.startswith(f"{TEST_PREFIX}:")}
    choices = [o for o in range(0x10, 0x1000) if f"{o:x}" not in used]
    return random.sample(choices, n)


@contextlib.contextmanager
def pod6(subnet: int, v4_octet: int | None = None) -> Iterator[Pod6]:
    """A namespace with a veth to the host: IPv6 fd00:250:<subnet>::2/64 (host ::1), and when
    v4_octet is given also IPv4 10.250.<v4_octet>.2/30 (host .1): a dual-stack pod."""
    tag = uuid.uuid4().hex[:6]
    netns, host_if, peer_if = f"l7t-{tag}", f"l7h{tag}", f"l7p{tag}"
    host6, pod6_ip = f"{TEST_PREFIX}:{subnet:x}::1", f"{TEST_PREFIX}:{subnet:x}::2"
    host4 = pod4 = None
    if v4_octet is not None:
        host4, pod4 = f"10.250.{v4_octet}.1", f"10.250.{v4_octet}.2"
    enable_forwarding(ipv6=True)  # the host routes between the pods' /64s, as the agent does
    sh("ip", "netns", "add", netns)
    try:
        ns = ("ip", "netns", "exec", netns)
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", peer_if, "netns", netns)
        sh("ip", "-6", "addr", "add", f"{host6}/64", "dev", host_if, "nodad")
        sh(*ns, "ip", "-6", "addr", "add", f"{pod6_ip}/64", "dev", peer_if, "nodad")
        if pod4:
            sh("ip", "addr", "add", f"{host4}/30", "dev", host_if)
            sh(*ns, "ip", "addr", "add", f"{pod4}/30", "dev", peer_if)
        sh("ip", "link", "set", host_if, "up")
        sh(*ns, "ip", "link", "set", peer_if, "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        sh(*ns, "ip", "-6", "route", "add", "default", "via", host6)
        if pod4:
            sh(*ns, "ip", "route", "add", "default", "via", host4)
        yield Pod6(netns, host_if, pod4, host4, pod6_ip, host6)
    finally:
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", netns, check=False)


def sock6_in(netns: str | None, kind: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
    return sock_in(netns, kind, proto, family=socket.AF_INET6)


class EchoServer6(EchoServer):
    """EchoServer on an IPv6 address (TCP and UDP on one port)."""

    family = socket.AF_INET6


def tcp6_ok(netns: str | None, ip: str, port: int, timeout: float = 5.0) -> bool:
    return tcp_ok(netns, ip, port, timeout, family=socket.AF_INET6)


def udp6_ok(netns: str | None, ip: str, port: int, timeout: float = 3.0) -> bool:
    return udp_ok(netns, ip, port, timeout, family=socket.AF_INET6)


ICMP6_ECHO_REQUEST, ICMP6_ECHO_REPLY = 128, 129


def _echo_answered(s: socket.socket, packet: bytes, ip: str, reply: int, timeout: float) -> bool:
    """Send one ICMP/ICMPv6 echo request (packet) to ip on the raw socket s and wait for the echo
    reply kind with the same id and sequence; closes s. An IPv4 raw socket also hands back the IP
    header, which is skipped."""
    ident_seq = packet[4:8]
    try:
        s.sendto(packet, (ip, 0))
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            data, _ = s.recvfrom(1024)
            if s.family == socket.AF_INET:
                data = data[(data[0] & 0xF) * 4 :]  # after the IP header
            if data[0] == reply and data[4:8] == ident_seq:
                return True
        return False
    except OSError:
        return False
    finally:
        s.close()


def ping6_ok(netns: str, ip: str, timeout: float = 3.0) -> bool:
    """One ICMPv6 echo request from netns to ip, answered by an echo reply (a raw socket: the
    kernel fills in the ICMPv6 checksum)."""
    s = sock6_in(netns, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    ident, seq = os.getpid() & 0xFFFF, random.randrange(1 << 16)
    packet = struct.pack("!BBHHH", ICMP6_ECHO_REQUEST, 0, 0, ident, seq) + b"l7"
    return _echo_answered(s, packet, ip, ICMP6_ECHO_REPLY, timeout)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def ping4_ok(netns: str, ip: str, timeout: float = 3.0) -> bool:
    """One ICMP echo request from netns to ip, answered (a raw socket; the checksum is ours)."""
    s = sock_in(netns, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident, seq = os.getpid() & 0xFFFF, random.randrange(1 << 16)
    head = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"l7"
    packet = head[:2] + struct.pack("!H", _checksum(head)) + head[4:]
    return _echo_answered(s, packet, ip, 0, timeout)
