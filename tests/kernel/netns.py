"""Network namespaces and veth pairs made by tests, always removed afterwards."""

from __future__ import annotations

import contextlib
import ctypes
import json
import random
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from l7proxy.agent.netdev import enable_forwarding


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


class InNetns:
    """run/popen a command inside self.netns (shared by the IPv4 and the IPv6 pods)."""

    __slots__ = ()
    netns: str

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *args], capture_output=True, text=True, **kw
        )

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *args], **kw)


@dataclass(frozen=True, slots=True)
class Pod(InNetns):
    netns: str
    host_if: str
    pod_ip: str
    host_ip: str
    pod_if: str  # the veth's end in the pod's namespace


def free_octets(n: int) -> list[int]:
    """n third octets of 10.250.N.0 that no interface on this host uses (parallel runs)."""
    used = set()
    out = sh("ip", "-4", "-o", "addr", "show").stdout
    for word in out.split():
        if word.startswith("10.250."):
            used.add(int(word.split(".")[2]))
    choices = [o for o in range(10, 200) if o not in used]
    return random.sample(choices, n)


@contextlib.contextmanager
def pod(subnet_octet: int) -> Iterator[Pod]:
    """A namespace with a /30 veth to the host: host 10.250.N.1, pod 10.250.N.2."""
    tag = uuid.uuid4().hex[:6]
    netns, host_if, peer_if = f"l7t-{tag}", f"l7h{tag}", f"l7p{tag}"
    host_ip, pod_ip = f"10.250.{subnet_octet}.1", f"10.250.{subnet_octet}.2"
    enable_forwarding()  # the host routes between the pods (a fresh machine boots without)
    sh("ip", "netns", "add", netns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer_if)
        sh("ip", "link", "set", peer_if, "netns", netns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        ns = ("ip", "netns", "exec", netns)
        sh(*ns, "ip", "addr", "add", f"{pod_ip}/30", "dev", peer_if)
        sh(*ns, "ip", "link", "set", peer_if, "up")
        sh(*ns, "ip", "link", "set", "lo", "up")
        sh(*ns, "ip", "route", "add", "default", "via", host_ip)
        yield Pod(netns, host_if, pod_ip, host_ip, peer_if)
    finally:
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", netns, check=False)


# --- sockets inside a namespace, from this process ------------------------------------------
# A network namespace is per thread: a short-lived thread joins the namespace, makes the socket
# and exits; the socket keeps its namespace wherever it is used afterwards.

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(netns: str, fn, *args):
    result: dict = {}

    def run():
        try:
            with open(f"/run/netns/{netns}") as f:
                if _libc.setns(f.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            result["value"] = fn(*args)
        except BaseException as e:  # handed to the caller
            result["error"] = e

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def sock_in(
    netns: str | None, kind: int = socket.SOCK_STREAM, proto: int = 0, family: int = socket.AF_INET
) -> socket.socket:
    if netns is None:
        return socket.socket(family, kind, proto)
    return in_netns(netns, socket.socket, family, kind, proto)


class EchoServer:
    """TCP and UDP echo on one port of an address, served by daemon threads."""

    family = socket.AF_INET

    def __init__(self, netns: str | None, ip: str, port: int = 0):
        self.tcp = sock_in(netns, family=self.family)
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind((ip, port))
        self.port = self.tcp.getsockname()[1]
        self.tcp.listen(64)
        self.udp = sock_in(netns, socket.SOCK_DGRAM, family=self.family)
        self.udp.bind((ip, self.port))
        self.peers: list[tuple[str, int]] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()
        threading.Thread(target=self._udp, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                conn, peer = self.tcp.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def _udp(self):
        while not self._closed:
            try:
                data, peer = self.udp.recvfrom(65536)
                if peer is None:
                    return
                self.udp.sendto(data, peer)
            except OSError:
                return

    def close(self):
        self._closed = True
        for s in (self.tcp, self.udp):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


# A dropped SYN is never answered however loaded the machine is, so "blocked" checks can be
# short; "reachable" checks get a generous timeout so a busy CI box does not fail them.
BLOCKED = 0.5


def tcp_ok(
    netns: str | None, ip: str, port: int, timeout: float = 5.0, family: int = socket.AF_INET
) -> bool:
    """A TCP connect plus one echoed message from inside netns."""
    s = sock_in(netns, family=family)
    s.settimeout(timeout)
    try:
        s.connect((ip, port))
        s.sendall(b"ping")
        return s.recv(16) == b"ping"
    except OSError:
        return False
    finally:
        s.close()


def udp_ok(
    netns: str | None, ip: str, port: int, timeout: float = 3.0, family: int = socket.AF_INET
) -> bool:
    s = sock_in(netns, socket.SOCK_DGRAM, family=family)
    s.settimeout(timeout)
    try:
        s.sendto(b"ping", (ip, port))
        return s.recvfrom(16)[0] == b"ping"
    except OSError:
        return False
    finally:
        s.close()


@contextlib.contextmanager
def forward_counter(src: str, dst: str, *, netns: str | None = None, both_ways: bool = True):
    """A netfilter table of its own counting the packets a namespace's stack forwards from src
    to dst (and back, with both_ways); the host's namespace unless `netns` is given. Yields a
    function that reads the count."""
    enter = ("nsenter", f"--net=/var/run/netns/{netns}", "--") if netns else ()
    family = "ip6" if ":" in src else "ip"
    table = f"l7fwd{uuid.uuid4().hex[:6]}"
    pairs = ((src, dst), (dst, src)) if both_ways else ((src, dst),)
    rules = "".join(f"  {family} saddr {a} {family} daddr {b} counter\n" for a, b in pairs)
    chain = " chain passing {\n  type filter hook forward priority 0;\n"
    subprocess.run([*enter, "nft", "-f", "-"], input=f"table inet {table} {{\n{chain}{rules} }}\n}}\n",
                   text=True, check=True)  # fmt: skip

    def packets() -> int:
        out = sh(*enter, "nft", "list", "table", "inet", table).stdout
        return sum(int(w.split()[0]) for w in out.split("counter packets ")[1:])

    try:
        yield packets
    finally:
        sh(*enter, "nft", "delete", "table", "inet", table, check=False)


def link(dev: str, netns: str | None = None) -> dict:
    """`ip -s -j link show dev` (in netns if given): its "address", its "stats64" counters."""
    where = ("-n", netns) if netns else ()
    return json.loads(sh("ip", *where, "-s", "-j", "link", "show", dev).stdout)[0]


def tx_packets(dev: str, netns: str | None = None) -> int:
    """Packets dev has transmitted (link())."""
    return link(dev, netns)["stats64"]["tx"]["packets"]
