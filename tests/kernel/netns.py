"""Network namespaces and veth pairs made by tests, always removed afterwards."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True)


@dataclass(frozen=True, slots=True)
class Pod:
    netns: str
    host_if: str
    pod_ip: str
    host_ip: str

    def run(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *args], capture_output=True, text=True, **kw
        )

    def popen(self, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.netns, *args], **kw)


@contextlib.contextmanager
def pod(subnet_octet: int) -> Iterator[Pod]:
    """A namespace with a /30 veth to the host: host 10.250.N.1, pod 10.250.N.2."""
    tag = uuid.uuid4().hex[:6]
    netns, host_if, peer_if = f"l7t-{tag}", f"l7h{tag}", f"l7p{tag}"
    host_ip, pod_ip = f"10.250.{subnet_octet}.1", f"10.250.{subnet_octet}.2"
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
        yield Pod(netns, host_if, pod_ip, host_ip)
    finally:
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", netns, check=False)
