"""The benchmarks' reference path across two lab nodes without any BPF program: two plain
namespaces (no tc filters) joined to node1 and node2 by veths, linked by a plain VXLAN device
(static VNI, remote = the peer's underlay IP) or by plain routes over the underlay. Named with the
lab's prefix, so `l7proxy lab down` removes them too."""

from __future__ import annotations

import contextlib
import subprocess

BENCH_NETS = {"node1": "10.253.1", "node2": "10.253.2"}
VXLAN_ADDR = {"node1": "10.254.0.1", "node2": "10.254.0.2"}


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def _in(netns: str, *args: str) -> None:
    sh("ip", "-n", netns, *args)


@contextlib.contextmanager
def plain_path(routing: str, underlay: dict[str, str]):
    """Yields {node: (netns of the plain pod, its IP)} for node1 and node2."""
    made = []
    try:
        pods = {}
        for node, net in BENCH_NETS.items():
            host, pod = f"l7lab-{node}", f"l7lab-bench-{node}"
            sh("ip", "netns", "add", pod)
            made.append(pod)
            _in(
                host,
                "link",
                "add",
                "l7lab-bv",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                pod,
            )
            _in(host, "addr", "add", f"{net}.1/24", "dev", "l7lab-bv")
            _in(host, "link", "set", "l7lab-bv", "up")
            _in(pod, "addr", "add", f"{net}.2/24", "dev", "eth0")
            _in(pod, "link", "set", "eth0", "up")
            _in(pod, "link", "set", "lo", "up")
            _in(pod, "route", "add", "default", "via", f"{net}.1")
            pods[node] = (pod, f"{net}.2")
        for node, peer in (("node1", "node2"), ("node2", "node1")):
            host = f"l7lab-{node}"
            if routing == "tunnel":
                _in(host, "link", "add", "l7lab-vxb", "type", "vxlan", "id", "42", "dstport",
                    "4790", "local", underlay[node], "remote", underlay[peer])  # fmt: skip
                _in(host, "addr", "add", f"{VXLAN_ADDR[node]}/24", "dev", "l7lab-vxb")
                _in(host, "link", "set", "l7lab-vxb", "up")
                via = VXLAN_ADDR[peer]
            else:
                via = underlay[peer]
            _in(host, "route", "add", f"{BENCH_NETS[peer]}.0/24", "via", via)
        yield pods
    finally:
        for node in BENCH_NETS:
            for link in ("l7lab-bv", "l7lab-vxb"):
                subprocess.run(["ip", "-n", f"l7lab-{node}", "link", "del", link],
                               capture_output=True, check=False)  # fmt: skip
        for pod in made:
            subprocess.run(["ip", "netns", "del", pod], capture_output=True, check=False)
