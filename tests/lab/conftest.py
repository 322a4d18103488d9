"""A 3-node lab per routing mode (`l7proxy lab up`), shared by the module's tests: real etcd,
real agents in node namespaces, real BPF programs, pods on different nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import need_binary

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BRIDGE_IP = "10.251.0.1"


def cli(*args: str, node: str | None = None, timeout: float = 60, check: bool = True) -> str:
    cmd = [sys.executable, "-m", "l7proxy", *(("--node", node) if node else ()), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


@dataclass
class Lab:
    routing: str
    ips: dict[str, str] = field(default_factory=dict)  # endpoint -> IP
    identities: dict[str, int] = field(default_factory=dict)
    nodes: dict[str, dict] = field(default_factory=dict)  # cluster status per node
    servers: list[subprocess.Popen] = field(default_factory=list)

    def curl(self, node: str, ep: str, url: str, *, method: str = "GET", wait: float = 3) -> str:
        """The HTTP status a pod gets ("000": no connection within `wait` seconds)."""
        out = cli(
            "endpoint", "exec", ep, "--", "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
            "-m", str(wait), "-X", method, url,
            node=node, check=False, timeout=wait + 20,
        )  # fmt: skip
        return out.strip()[-3:]

    def host_curl(self, netns: str | None, url: str, wait: float = 3) -> str:
        """The HTTP status from a node's host namespace (or, with None, the root namespace:
        an outside host on the underlay)."""
        cmd = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", str(wait), url]
        if netns:
            cmd = ["nsenter", f"--net=/var/run/netns/{netns}", "--", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=wait + 10).stdout
        return out.strip()[-3:]

    def flows(self, node: str, last: int = 200) -> list[dict]:
        out = cli("observe", "--last", str(last), "-o", "json", node=node)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def status(self) -> dict:
        return json.loads(cli("cluster", "status", "-o", "json"))


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _endpoint(lab: Lab, node: str, name: str, labels: str) -> None:
    cli("endpoint", "create", name, "--labels", labels, node=node)
    for ep in json.loads(cli("endpoint", "list", "-o", "json", node=node)):
        if ep["name"] == name:
            lab.ips[name], lab.identities[name] = ep["ip"], ep["identity"]


@pytest.fixture(scope="module", params=["tunnel", "native"])
def lab(request):
    need_binary("etcd")
    need_binary("curl")
    cli("lab", "down")
    lab = Lab(request.param)
    route = None
    try:
        cli("lab", "up", "--nodes", "3", "--routing", lab.routing, "--lease-ttl", "5", timeout=240)
        _endpoint(lab, "node1", "frontend", "app=frontend")
        _endpoint(lab, "node1", "other", "app=other")
        _endpoint(lab, "node2", "backend", "app=backend")
        _endpoint(lab, "node3", "reader", "app=reader")
        lab.nodes = {n["name"]: n for n in lab.status()["nodes"]}
        env = dict(os.environ, PYTHONPATH=str(REPO))
        lab.servers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "l7proxy",
                    "--node",
                    "node2",
                    "endpoint",
                    "exec",
                    "backend",
                    "--",
                    sys.executable,
                    str(HERE / "servers.py"),
                    "8080",
                    "9090",
                    "9091",
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )  # fmt: skip
        )
        backend = lab.ips["backend"]
        wait_for(
            lambda: lab.curl("node1", "frontend", f"http://{backend}:9090/") == "200",
            30,
            "the backend's servers (before any policy)",
        )
        # The root namespace plays an outside host on the underlay (CIDR rules): it routes the
        # backend's pod CIDR to node2 like a router in front of the cluster would.
        route = lab.nodes["node2"]["pod_cidr"]
        subprocess.run(["ip", "route", "replace", route, "via", lab.nodes["node2"]["underlay_ip"]],
                       check=True)  # fmt: skip
        out = cli("policy", "import", str(HERE / "policy.yaml"), node="node1")
        revision = int(out.split()[-1])
        wait_for(
            lambda: all(n["policy_revision"] == revision for n in lab.status()["nodes"]),
            30,
            f"policy revision {revision} in force on every node",
        )
        yield lab
    finally:
        for server in lab.servers:
            server.kill()
            server.wait(10)
        if route:
            subprocess.run(["ip", "route", "del", route], check=False)
        cli("lab", "down", timeout=120)
        left = [p.name for p in Path("/var/run/netns").glob("l7lab-*")]
        left += [p.name for p in Path("/sys/fs/bpf/l7proxy").glob("lab-*")]
        assert not left, f"lab down left {left}"


def pytest_collection_modifyitems(config, items):
    """A `tunnel_only` test is not collected for the native-routing lab (rather than skipped:
    under CI=true lab tests run or fail, they never skip)."""
    native = [
        item
        for item in items
        if item.get_closest_marker("tunnel_only") and "[native]" in item.nodeid
    ]
    if native:
        config.hook.pytest_deselected(items=native)
        items[:] = [item for item in items if item not in native]
