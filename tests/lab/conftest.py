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
    ips6: dict[str, str] = field(default_factory=dict)  # endpoint -> IPv6 (the lab is dual stack)
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


def in_pod(node: str, ep: str, *cmd: str, **popen) -> subprocess.Popen:
    """A long-running command inside an endpoint (`l7proxy --node N endpoint exec EP -- ...`:
    the returned process is the command itself, which `ip netns exec` became)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    argv = [sys.executable, "-m", "l7proxy", "--node", node, "endpoint", "exec", ep, "--", *cmd]
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(argv, env=env, **popen)


class KeepAlive:
    """One keep-alive HTTP connection from a pod, one GET per ask()."""

    def __init__(self, node: str, ep: str, ip: str, port: int) -> None:
        script = str(HERE / "keepalive_client.py")
        self.proc = in_pod(node, ep, sys.executable, script, ip, str(port),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip

    def ask(self, path: str) -> str:
        self.proc.stdin.write(path + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def pinned_map(node: str, name: str) -> dict[bytes, bytes]:
    """A node's pinned BPF map as {key bytes: value bytes}."""
    from l7proxy.lab import state
    from redirect_bpf import bpfsys, structs
    from redirect_bpf.maps import BpfMap

    key_type, value_type, percpu = structs.MAPS[name]
    fd = bpfsys.obj_get(state.BPF_PIN_ROOT / f"lab-{node}" / f"map_{name}")
    bpf_map = BpfMap(name, fd, key_type, value_type, percpu)
    try:
        return {bytes(k): bytes(v) for k, v in bpf_map.items()}
    finally:
        bpf_map.close()


def remote_view(node: str, maps: tuple[str, ...] = ("ipcache", "ipcache6")) -> tuple[set, set]:
    """What a node's maps say about the others: (underlay IPs in its nodes map, tunnel
    endpoints its ipcache entries carry, IPv4 and IPv6 ones unless `maps` says which)."""
    from redirect_bpf import ipcache, structs

    nodes = {
        ipcache.ip_of(structs.u32.from_buffer_copy(k).value) for k in pinned_map(node, "nodes")
    }
    values = [v for name in maps for v in pinned_map(node, name).values()]
    tunnels = {
        ipcache.ip_of(v.tunnel_endpoint)
        for v in map(structs.IpcacheValue.from_buffer_copy, values)
        if v.tunnel_endpoint
    }
    return nodes, tunnels


def ipcache_entry(node: str, ip: str):
    """A node's BPF ipcache (ipcache6 for IPv6) value for exactly ip/32 or ip/128, or None."""
    from redirect_bpf import ipcache, structs

    six = ipcache.family(ip) == 6
    key = ipcache.key(f"{ip}/128" if six else f"{ip}/32")
    value = pinned_map(node, "ipcache6" if six else "ipcache").get(bytes(key))
    return structs.IpcacheValue.from_buffer_copy(value) if value else None


def ipcache_identity(node: str, ip: str) -> int | None:
    """The identity a node's BPF ipcache holds for exactly ip/32 (None: no such entry)."""
    value = ipcache_entry(node, ip)
    return value.identity if value else None


def _endpoint(lab: Lab, node: str, name: str, labels: str) -> None:
    cli("endpoint", "create", name, "--labels", labels, node=node)
    learn_endpoint(lab, node, name)


def learn_endpoint(lab: Lab, node: str, name: str) -> None:
    """Note an endpoint's address and identity as its node lists it."""
    for ep in json.loads(cli("endpoint", "list", "-o", "json", node=node)):
        if ep["name"] == name:
            lab.ips[name], lab.identities[name] = ep["ip"], ep["identity"]
            lab.ips6[name] = ep.get("ip6", "")


@pytest.fixture(scope="module", params=["tunnel", "native"])
def lab(request):
    need_binary("etcd")
    need_binary("curl")
    cli("lab", "down")
    lab = Lab(request.param)
    route = None
    orphan = None  # left running on purpose: `lab down` must stop what runs in lab namespaces
    try:
        cli("lab", "up", "--nodes", "3", "--routing", lab.routing, "--lease-ttl", "5", timeout=240)
        _endpoint(lab, "node1", "frontend", "app=frontend")
        _endpoint(lab, "node1", "other", "app=other")
        _endpoint(lab, "node2", "backend", "app=backend")
        _endpoint(lab, "node3", "reader", "app=reader")
        lab.nodes = {n["name"]: n for n in lab.status()["nodes"]}
        orphan = in_pod("node3", "reader", "sleep", "600")
        servers = str(HERE / "servers.py")
        lab.servers.append(
            in_pod("node2", "backend", sys.executable, servers, "8080", "9090", "9091")
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
        if orphan is not None:
            try:
                orphan.wait(10)
            except subprocess.TimeoutExpired:
                orphan.kill()
                raise AssertionError(
                    "lab down left a process running in a pod's namespace"
                ) from None


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
