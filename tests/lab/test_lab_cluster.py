"""Pods on different nodes of a 3-node lab, tunnel and native routing: L3 by labels, L4 ports,
deny over allow, entity and CIDR rules, L7 HTTP on the destination's and on the source's node,
replies through enforced directions, and (tunnel) forged VXLAN identities being dropped.

frontend and other run on node1, backend on node2, reader on node3 (tests/lab/policy.yaml):
  backend  ingress: frontend, reader -> 8080 with HTTP GET /public.*; any endpoint -> 9090, but
           `other` denied there; remote-node and 10.251.0.1/32 -> 9091. egress: nothing.
  frontend ingress: nothing. egress: backend 8080 and 9090 with HTTP GET only.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time

import pytest

from tests.lab.conftest import HERE, REPO, wait_for

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def test_every_node_is_up_with_its_own_pod_cidr(lab):
    status = lab.status()
    nodes = {n["name"]: n for n in status["nodes"]}
    assert sorted(nodes) == ["node1", "node2", "node3"]
    assert all(n["health"] == "ok" and n["routing"] == lab.routing for n in nodes.values())
    assert len({n["pod_cidr"] for n in nodes.values()}) == 3

    assert ipaddress.ip_address(lab.ips["backend"]) in ipaddress.ip_network(
        nodes["node2"]["pod_cidr"]
    )
    assert ipaddress.ip_address(lab.ips["frontend"]) in ipaddress.ip_network(
        nodes["node1"]["pod_cidr"]
    )


def _l7_denials(lab, node: str, path: str) -> list[dict]:
    return [
        f for f in lab.flows(node)
        if f.get("l7") and f["verdict"] == "DROPPED" and path in str(f["l7"])
    ]  # fmt: skip


def test_l7_ingress_rule_on_the_destination_node(lab):
    backend = lab.ips["backend"]
    assert lab.curl("node3", "reader", f"http://{backend}:8080/public/a") == "200"
    assert lab.curl("node3", "reader", f"http://{backend}:8080/private/r") == "403"
    # the 403 came from node2's proxy: its flow names the client on node3 by its labels
    denied = _l7_denials(lab, "node2", "/private/r")
    assert denied, "node2 recorded no L7 denial"
    assert "k8s:app=reader" in denied[-1]["source"]["labels"]


def test_l7_on_both_nodes_for_one_flow(lab):
    """frontend's egress L7 (GET only, node1's proxy) and backend's ingress L7 (GET /public.*,
    node2's proxy): node2's proxy still sees frontend, not node1."""
    backend = lab.ips["backend"]
    assert lab.curl("node1", "frontend", f"http://{backend}:8080/public/f") == "200"
    assert lab.curl("node1", "frontend", f"http://{backend}:8080/private/f") == "403"
    assert lab.curl("node1", "frontend", f"http://{backend}:8080/public/f", method="POST") == "403"
    denied = _l7_denials(lab, "node2", "/private/f")
    assert denied and "k8s:app=frontend" in denied[-1]["source"]["labels"]
    assert _l7_denials(lab, "node1", "/public/f"), "the POST was not denied on node1"


def test_l3_by_labels_and_l4_ports(lab):
    backend = lab.ips["backend"]
    assert lab.curl("node1", "other", f"http://{backend}:8080/public") == "000"  # not frontend
    assert lab.curl("node1", "other", f"http://{backend}:9091/") == "000"  # no rule for pods
    drops = [
        f for f in lab.flows("node2")
        if f["verdict"] == "DROPPED" and f["source"]["identity"] == lab.identities["other"]
    ]  # fmt: skip
    assert drops and drops[-1]["traffic_direction"] == "INGRESS"
    assert "k8s:app=other" in drops[-1]["source"]["labels"]


def test_deny_beats_allow_across_nodes(lab):
    backend = lab.ips["backend"]
    # 9090 allows every endpoint, and denies `other`
    assert lab.curl("node1", "other", f"http://{backend}:9090/") == "000"
    reasons = {
        f.get("drop_reason_desc") for f in lab.flows("node2")
        if f["verdict"] == "DROPPED" and f["source"]["identity"] == lab.identities["other"]
    }  # fmt: skip
    assert "POLICY_DENY" in reasons


def test_entity_remote_node_and_cidr_rules(lab):
    backend = lab.ips["backend"]
    assert lab.host_curl("l7lab-node1", f"http://{backend}:9091/") == "200"  # remote-node
    assert lab.host_curl(None, f"http://{backend}:9091/") == "200"  # 10.251.0.1/32
    assert lab.host_curl(None, f"http://{backend}:9090/") == "000"  # world: no rule


def test_egress_l7_on_the_source_node_keeps_the_client_identity(lab):
    backend = lab.ips["backend"]
    # node1's proxy enforces GET-only; its upstream carries frontend's identity (tunnel: in the
    # VNI; native: frontend's own address, which node2's ipcache knows), which
    # backend's "any endpoint -> 9090" rule needs (the node itself would be remote-node: denied)
    assert lab.curl("node1", "frontend", f"http://{backend}:9090/x") == "200"
    assert lab.curl("node1", "frontend", f"http://{backend}:9090/x", method="POST") == "403"
    fwd = [
        f for f in lab.flows("node2")
        if f["verdict"] == "FORWARDED" and f["destination"].get("ip") == backend
        and f.get("l4", {}).get("TCP", {}).get("destination_port") == 9090
    ]  # fmt: skip
    assert fwd and fwd[-1]["source"]["identity"] == lab.identities["frontend"]


@pytest.mark.tunnel_only  # native routing has no VXLAN device: the test exists for tunnel only
def test_forged_vxlan_identities_are_dropped(lab):
    backend, frontend = lab.ips["backend"], lab.ips["frontend"]
    node2 = lab.nodes["node2"]["underlay_ip"]
    forge = [sys.executable, str(HERE / "forge.py"), node2]
    # from a pod: frontend's own identity (allowed to 9090) claimed by `other`
    out = subprocess.run(
        [sys.executable, "-m", "l7proxy", "--node", "node1", "endpoint", "exec", "other", "--",
         *forge, str(lab.identities["frontend"]), frontend, backend, "9090"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    # from the underlay (the root namespace, no node): a made-up identity
    subprocess.run([*forge, "424242", frontend, backend, "9091"], check=True, timeout=30)

    def drops():
        return [
            f for f in lab.flows("node2", 500)
            if f.get("drop_reason_desc") == "UNKNOWN_TUNNEL_SOURCE"
        ]  # fmt: skip

    wait_for(lambda: len({f["source"]["identity"] for f in drops()}) >= 2, 10, "both drops")
    claimed = {f["source"]["identity"]: f for f in drops()}
    assert lab.identities["frontend"] in claimed and 424242 in claimed
    assert claimed[424242]["l4"]["TCP"]["destination_port"] == 9091
    time.sleep(0.5)
    forwarded = [
        f for f in lab.flows("node2", 500)
        if f["verdict"] != "DROPPED" and f.get("l4", {}).get("TCP", {}).get("source_port") == 40000
    ]  # fmt: skip
    assert not forwarded, f"a forged packet got through: {forwarded}"


def test_established_cross_node_flow_survives_agent_restarts(lab):
    """reader (node3) keeps one connection to backend (node2) while both nodes' agents are
    SIGKILLed and started again: the pinned programs and maps, the VXLAN device and the routes
    stay, and the restarted agents' setup leaves them as they are."""
    from tests.lab.conftest import cli

    env = dict(os.environ, PYTHONPATH=str(REPO))
    client = subprocess.Popen(
        [sys.executable, "-m", "l7proxy", "--node", "node3", "endpoint", "exec", "reader", "--",
         sys.executable, str(HERE / "keepalive_client.py"), lab.ips["backend"], "9090"],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    def ask(path: str) -> str:
        client.stdin.write(path + "\n")
        client.stdin.flush()
        return client.stdout.readline().strip()

    try:
        assert ask("/before") == "200"
        cli("lab", "node", "stop", "node2")
        cli("lab", "node", "stop", "node3")
        assert ask("/agents-down") == "200"
        cli("lab", "node", "start", "node2")
        cli("lab", "node", "start", "node3")
        assert ask("/agents-back") == "200"
    finally:
        client.kill()
        client.wait(10)
    # and new connections work after the restart
    assert lab.curl("node3", "reader", f"http://{lab.ips['backend']}:8080/public/n") == "200"


@pytest.mark.xfail(
    strict=False,
    reason="known open defect (issue 15): in some full-suite runs node1 keeps reaching a removed "
    "node's pod after its lease expired (seen in tunnel and native mode, 1 run in 4); the test "
    "still runs and must pass when the defect is fixed",
)
def test_a_removed_node_s_pods_are_dropped_not_tunnelled(lab):
    """Last in the module: node3's agent is killed and its lease expires; node1 forgets node3's
    pods (ipcache, nodes map, routes) and drops traffic to them instead of sending it to a
    stale tunnel, while node3's own datapath (pinned) still serves the pod locally."""
    from tests.lab.conftest import _endpoint, cli

    _endpoint(lab, "node3", "web3", "app=web3")
    web3 = lab.ips["web3"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    lab.servers.append(
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "l7proxy",
                "--node",
                "node3",
                "endpoint",
                "exec",
                "web3",
                "--",
                sys.executable,
                str(HERE / "servers.py"),
                "8080",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
    )
    wait_for(lambda: lab.curl("node1", "other", f"http://{web3}:8080/") == "200", 20, "web3")
    cli("lab", "node", "stop", "node3")
    wait_for(
        lambda: "node3" not in {n["name"] for n in lab.status()["nodes"]},
        30,
        "node3's lease to expire",
    )
    wait_for(lambda: lab.curl("node1", "other", f"http://{web3}:8080/", wait=2) == "000", 45,
             "node1 to stop reaching web3")  # fmt: skip
    if lab.routing == "tunnel":
        wait_for(
            lambda: any(
                f.get("drop_reason_desc") == "NO_TUNNEL_ENDPOINT"
                and f["destination"].get("ip") == web3
                for f in lab.flows("node1", 500)
            ),
            10,
            "a NO_TUNNEL_ENDPOINT drop on node1",
        )
    # the pod itself still answers on its node: only the cluster forgot it
    assert lab.host_curl("l7lab-node3", f"http://{web3}:8080/") == "200"
