"""Cluster numbers (issue 15), on a lab (`l7proxy lab up`):

- policy propagation: time from `policy import` returning on node1 to the new rule being in the
  BPF policy map of every node, over CHANGES one-rule changes, with 3 and with 10 nodes;
- cross-node throughput: iperf3 pod to pod across nodes, tunnel and native, with policy,
  against the same path with no BPF programs (plain VXLAN device / plain routes).

Run alone (`flock /tmp/l7bench.lock pytest -m bench tests/bench/test_cluster_bench.py -s`): the
10-node lab runs 10 agents.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from l7proxy.agent.client import Client
from tests.bench.cluster_paths import plain_path
from tests.conftest import need_binary
from tests.lab.conftest import REPO, Lab, _endpoint, cli

pytestmark = [pytest.mark.bench, pytest.mark.root, pytest.mark.bpf]

CHANGES = int(os.environ.get("BENCH_POLICY_CHANGES", "50"))
IPERF_SECONDS = int(os.environ.get("BENCH_IPERF_SECONDS", "5"))

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: target}}
spec:
  endpointSelector: {{matchLabels: {{app: target}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: client}}}}]
    toPorts: [{{ports: [{{port: "{port}", protocol: TCP}}]}}]
"""


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _allow_maps(lab_state) -> list:
    from redirect_bpf import loader

    return [loader.open_pinned(Path(n.bpf_dir)) for n in lab_state.nodes.values()]


def _has_port(loaded, port: int) -> bool:
    want = socket.htons(port)
    return any(k.dport == want and k.direction == 0 for k, _ in loaded.maps["policy_allow"].items())


@pytest.mark.parametrize("nodes", [3, 10])
def test_policy_propagation(nodes):
    from l7proxy.lab.state import LabState

    need_binary("etcd")
    cli("lab", "down")
    loaded = []
    try:
        cli("lab", "up", "--nodes", str(nodes), timeout=600)
        for i in range(1, nodes + 1):
            cli("endpoint", "create", "target", "--labels", "app=target", node=f"node{i}")
        cli("endpoint", "create", "client", "--labels", "app=client", node="node1")
        lab_state = LabState.load()
        loaded = _allow_maps(lab_state)
        client = Client(lab_state.node("node1").socket)
        times, with_call = [], []
        for i in range(CHANGES):
            port = 20000 + i
            files = [{"name": "target.yaml", "text": POLICY.format(port=port)}]
            sent = time.monotonic()
            client.call("policy.import", files=files)  # returns once etcd holds the new set
            start = time.monotonic()
            pending = list(loaded)
            while pending:
                pending = [m for m in pending if not _has_port(m, port)]
                if time.monotonic() - start > 30:
                    raise AssertionError(f"rule {port} not on {len(pending)} nodes after 30 s")
                time.sleep(0.001)
            done = time.monotonic()
            times.append(done - start)
            with_call.append(done - sent)
        p50, p99, top = (_percentile(times, q) * 1000 for q in (0.5, 0.99, 1.0))
        c50, c99, ctop = (_percentile(with_call, q) * 1000 for q in (0.5, 0.99, 1.0))
        print(
            f"\npolicy propagation, {nodes} nodes, {CHANGES} one-rule changes, import returned "
            f"-> in every node's BPF map: p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {top:.1f} ms "
            f"(target p99 < 1000 ms); import sent -> every map: p50 {c50:.1f} ms, "
            f"p99 {c99:.1f} ms, max {ctop:.1f} ms"
        )
        assert len(times) == CHANGES
    finally:
        for m in loaded:
            m.close()
        cli("lab", "down", timeout=300)


def _iperf(client_cmd: list[str], server: str) -> float:
    out = subprocess.run(
        [*client_cmd, "iperf3", "-c", server, "-t", str(IPERF_SECONDS), "-J"],
        capture_output=True, text=True, timeout=IPERF_SECONDS + 60,
    )  # fmt: skip
    data = json.loads(out.stdout[out.stdout.index("{") :])
    return data["end"]["sum_received"]["bits_per_second"] / 1e9


@pytest.mark.parametrize("routing", ["tunnel", "native"])
def test_cross_node_throughput(routing, tmp_path):
    need_binary("etcd")
    need_binary("iperf3")
    cli("lab", "down")
    lab = Lab(routing)
    servers = []
    env = dict(os.environ, PYTHONPATH=str(REPO))
    try:
        cli("lab", "up", "--nodes", "2", "--routing", routing, timeout=300)
        _endpoint(lab, "node1", "cli", "app=client")
        _endpoint(lab, "node2", "srv", "app=target")
        path = tmp_path / "p.yaml"
        path.write_text(POLICY.format(port=5201))
        cli("policy", "import", str(path), node="node1")
        servers.append(subprocess.Popen(
            [sys.executable, "-m", "l7proxy", "--node", "node2", "endpoint", "exec", "srv", "--",
             "iperf3", "-s"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))  # fmt: skip
        via_lab = [
            sys.executable,
            "-m",
            "l7proxy",
            "--node",
            "node1",
            "endpoint",
            "exec",
            "cli",
            "--",
        ]
        time.sleep(2)  # the server listens
        underlay = {n["name"]: n["underlay_ip"] for n in lab.status()["nodes"]}
        with plain_path(routing, underlay) as pods:
            srv_ns, srv_ip = pods["node2"]
            servers.append(subprocess.Popen(["ip", "netns", "exec", srv_ns, "iperf3", "-s"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
            time.sleep(1)
            plain_cmd = ["ip", "netns", "exec", pods["node1"][0]]
            results = {"plain": [], "l7proxy": []}
            for _ in range(2):  # in turn, so both see the same machine load
                results["plain"].append(_iperf(plain_cmd, srv_ip))
                results["l7proxy"].append(_iperf(via_lab, lab.ips["srv"]))
        plain, ours = (statistics.median(v) for v in results.values())
        print(
            f"\ncross-node iperf3 ({routing}, {IPERF_SECONDS}s x2 each): no programs "
            f"{plain:.2f} Gbit/s, l7proxy with policy {ours:.2f} Gbit/s, ratio {ours / plain:.2f}"
        )
        assert ours > 0
    finally:
        for s in servers:
            s.kill()
            s.wait(10)
        cli("lab", "down", timeout=300)
