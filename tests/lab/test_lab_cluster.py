"""Pods on different nodes of a 3-node lab, tunnel and native routing: L3 by labels, L4 ports,
deny over allow, entity and CIDR rules, L7 HTTP on the destination's and on the source's node
(inline, then in a proxy worker process on node1),
a Kafka topic denied across nodes, replies through enforced directions, (tunnel) forged VXLAN
identities being dropped; then the failure cases: a bad policy, etcd down, agents killed, and
a node removed (last: it kills node3).

frontend and other run on node1, backend on node2, reader on node3 (tests/lab/policy.yaml):
  backend  ingress: frontend, reader -> 8080 with HTTP GET /public.*; any endpoint -> 9090, but
           `other` denied there; remote-node and 10.251.0.1/32 -> 9091. egress: nothing.
  frontend ingress: nothing. egress: backend 8080 and 9090 with HTTP GET only.
  kafka    ingress: other -> 9092 with Kafka produce to lab-allowed only.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest

from redirect_bpf import ipcache
from tests.kernel.netns import forward_counter, tx_packets
from tests.lab.conftest import (
    HERE,
    REPO,
    KeepAlive,
    _endpoint,
    cli,
    in_pod,
    ipcache_entry,
    ipcache_identity,
    learn_endpoint,
    pinned_map,
    remote_view,
    wait_for,
)
from tests.pinned_config import host_routing

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
    assert drops[-1]["node_name"] == "node2"  # Hubble's field names the node that saw it


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


def test_egress_l7_in_a_proxy_worker_process_keeps_the_client_identity(lab):
    """node1's agent restarted with `--proxy-worker process`: the worker resolves other nodes'
    pods from the agent's state as the agent does, and its upstream carries frontend's identity
    (native routing: frontend's own address) like the inline proxy's. node1 keeps the worker."""
    cli("lab", "node", "stop", "node1")
    cli("lab", "node", "start", "node1", "--proxy-worker", "process")
    proxy = json.loads(cli("status", "-o", "json", node="node1"))["parts"]["proxy"]
    assert "worker pid" in proxy["detail"], proxy
    backend = lab.ips["backend"]
    url = f"http://{backend}:9090/worker"
    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")  # RFC 3339 times sort as text
    # 200 needs both: the worker allows frontend -> backend (it knows backend's identity) and
    # node2 sees frontend (remote-node, node1's own address, is not allowed on 9090)
    wait_for(lambda: lab.curl("node1", "frontend", url) == "200", 20, "the worker's GET")
    assert lab.curl("node1", "frontend", url, method="POST") == "403"
    seen = {
        f["source"]["identity"] for f in lab.flows("node2")
        if f["time"] >= since and f["destination"].get("ip") == backend
        and f.get("l4", {}).get("TCP", {}).get("destination_port") == 9090
    }  # fmt: skip
    assert seen == {lab.identities["frontend"]}, seen


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


KAFKA_PORT = 9092


def _noida() -> str:
    from importlib.resources import files

    found = files("noida_db").joinpath("noida-db")  # the broker itself, not the Python wrapper
    assert found.is_file(), "noida-db is not installed (make setup installs the test extra)"
    return str(found)


def test_kafka_topic_denied_across_nodes(lab, tmp_path):
    """A Kafka broker in a pod on node2, a client on node1: the kafka rule (produce to
    lab-allowed only) is enforced by node2's proxy for a client it knows by its identity."""
    _endpoint(lab, "node2", "kafka", "app=kafka")
    broker_ip = lab.ips["kafka"]
    argv = [_noida(), "start", "--only", "kafka", "--host", broker_ip,
            "--kafka-port", str(KAFKA_PORT), "--data-dir", str(tmp_path / "kafka")]  # fmt: skip
    lab.servers.append(in_pod("node2", "kafka", *argv))
    probe = (
        f"import socket; socket.create_connection(({broker_ip!r}, {KAFKA_PORT}), 1); print('ok')"
    )
    wait_for(
        lambda: cli("endpoint", "exec", "kafka", "--", sys.executable, "-c", probe,
                    node="node2", check=False, timeout=20).strip() == "ok",
        30, "the broker to listen",
    )  # fmt: skip
    bootstrap = f"{broker_ip}:{KAFKA_PORT}"
    out = cli("endpoint", "exec", "other", "--", sys.executable, str(HERE / "kafka_client.py"),
              bootstrap, "lab-allowed", "lab-denied", node="node1", timeout=90)  # fmt: skip
    assert out.splitlines() == [
        "lab-allowed produced",
        "lab-denied refused TopicAuthorizationFailedError",
    ], out
    denied = [
        f for f in lab.flows("node2", 500)
        if f["verdict"] == "DROPPED"
        and (f.get("l7") or {}).get("kafka", {}).get("topic") == "lab-denied"
    ]  # fmt: skip
    assert denied, "node2's proxy recorded no Kafka denial"
    assert "k8s:app=other" in denied[-1]["source"]["labels"]


BAD_POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: bad}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - toPorts:
    - ports:
      - port: "99999"
        protocol: TCP
"""


def _policy_state() -> dict:
    """Every node's policy maps and the revision each has in force."""
    revisions = {n["name"]: n["policy_revision"] for n in lab_status()["nodes"]}
    maps = {
        (node, name): pinned_map(node, name)
        for node in ("node1", "node2", "node3")
        for name in ("policy_allow", "policy_deny")
    }
    return {"revisions": revisions, "maps": maps}


def lab_status() -> dict:
    return json.loads(cli("cluster", "status", "-o", "json"))


def test_ipv6_across_nodes_by_labels_and_l7(lab):
    """Dual stack (the lab's --cluster-cidr6): pods have an IPv6 address from their node's IPv6
    pod CIDR, and the same policy holds for IPv6 flows across nodes: ingress L3 and L7 judged
    on node2 with the sender's identity (tunnel: the VNI of an IPv6 packet in VXLAN over IPv4;
    native: node2's ipcache6), deny over allow, and egress L7 on node1 keeping the client's
    identity."""
    backend6 = lab.ips6["backend"]
    nodes = {n["name"]: n for n in lab.status()["nodes"]}
    assert ipaddress.ip_address(backend6) in ipaddress.ip_network(nodes["node2"]["pod_cidr6"])
    assert len({n["pod_cidr6"] for n in nodes.values()}) == 3
    table = cli("cluster", "status")
    assert "POD CIDR6" in table and nodes["node2"]["pod_cidr6"] in table
    # node1's ipcache6: backend's address, its identity, node2's IPv4 underlay as endpoint
    entry = ipcache_entry("node1", backend6)
    assert entry is not None and entry.identity == lab.identities["backend"]
    assert ipcache.ip_of(entry.tunnel_endpoint) == nodes["node2"]["underlay_ip"]
    url = f"http://[{backend6}]"
    assert lab.curl("node3", "reader", f"{url}:8080/public/6") == "200"
    assert lab.curl("node3", "reader", f"{url}:8080/private/6") == "403"
    denied = _l7_denials(lab, "node2", "/private/6")
    assert denied and "k8s:app=reader" in denied[-1]["source"]["labels"]
    assert lab.curl("node1", "other", f"{url}:9090/") == "000"  # deny beats "any endpoint"
    drops = [
        f for f in lab.flows("node2")
        if f["verdict"] == "DROPPED" and f["destination"].get("ip") == backend6
        and f["source"]["identity"] == lab.identities["other"]
    ]  # fmt: skip
    assert drops and drops[-1]["traffic_direction"] == "INGRESS"
    assert drops[-1]["source"]["ip"] == lab.ips6["other"]
    # egress L7 (GET only) on node1; node2's "any endpoint -> 9090" needs frontend's identity
    assert lab.curl("node1", "frontend", f"{url}:9090/x6") == "200"
    assert lab.curl("node1", "frontend", f"{url}:9090/x6", method="POST") == "403"
    # an IPv6-only pod (no IPv4 address) in cluster mode, with reader's labels
    cli("endpoint", "create", "reader6", "--labels", "app=reader", "--ipv6-only", node="node3")
    learn_endpoint(lab, "node3", "reader6")
    assert lab.ips["reader6"] == "" and lab.ips6["reader6"]
    wait_for(lambda: ipcache_entry("node2", lab.ips6["reader6"]), 10, "reader6 on node2")
    assert lab.curl("node3", "reader6", f"{url}:8080/public/only6") == "200"
    cli("endpoint", "delete", "reader6", node="node3")


def test_a_bad_policy_is_refused_and_no_node_changes(lab, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_POLICY)
    before = _policy_state()
    # frontend's rules on node1, backend's allow and deny rules on node2 (reader has none)
    held = [("node1", "policy_allow"), ("node2", "policy_allow"), ("node2", "policy_deny")]
    assert all(before["maps"][m] for m in held), "policy maps are empty: nothing to compare"
    out = subprocess.run(
        [sys.executable, "-m", "l7proxy", "--node", "node2", "policy", "import", str(bad)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert out.returncode == 1, out
    assert "bad.yaml:9: spec.ingress[0].toPorts[0].ports[0].port:" in out.stderr, out.stderr
    assert "nothing changed" in out.stderr
    time.sleep(1)  # what a wrongly written set would need to reach the other nodes
    assert _policy_state() == before
    assert lab_status()["revision"] == max(before["revisions"].values())


def test_etcd_down_keeps_flows_and_verdicts_and_refuses_imports(lab):
    """etcd stopped: an established cross-node flow and every verdict keep working from the
    cached state, a known label set still gets its endpoint, a new one waits (saying so), and
    `policy import` fails at once saying why. etcd started again: every node is back without a
    restart, the waiting endpoint completes, and both endpoints are known across the cluster."""
    backend = lab.ips["backend"]
    flow = KeepAlive("node3", "reader", backend, 9090)
    try:
        assert flow.ask("/before") == "200"
        cli("lab", "etcd", "stop")
        wait_for(
            lambda: all(_link_state(n) == "unreachable" for n in ("node1", "node2", "node3")),
            20, "every node to notice etcd is gone",
        )  # fmt: skip
        assert flow.ask("/etcd-down") == "200"
        assert lab.curl("node1", "frontend", f"http://{backend}:8080/public/e") == "200"
        assert lab.curl("node1", "frontend", f"http://{backend}:8080/private/e") == "403"
        assert lab.curl("node1", "other", f"http://{backend}:9090/") == "000"
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "l7proxy", "--node", "node1", "policy", "import",
             str(HERE / "policy.yaml")],
            capture_output=True, text=True, timeout=30, env=dict(os.environ, PYTHONPATH=str(REPO)),
        )  # fmt: skip
        assert out.returncode == 1 and time.monotonic() - started < 5, out
        assert "needs the kvstore" in out.stderr and "unreachable" in out.stderr, out.stderr
        _endpoint(lab, "node3", "frontend2", "app=frontend")  # a known label set: no etcd needed
        assert lab.identities["frontend2"] == lab.identities["frontend"]
        late = subprocess.Popen(  # new labels: their identity needs etcd, so this one waits
            [sys.executable, "-m", "l7proxy", "--node", "node2", "endpoint", "create", "late",
             "--labels", "app=late"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )  # fmt: skip
        asked = time.monotonic()
        wait_for(
            lambda: "app=late" in "".join(_link("node2")["waiting_for_identity"]),
            10, "node2 to say which labels wait for an identity",
        )  # fmt: skip
        time.sleep(max(0.0, asked + 3.5 - time.monotonic()))  # the CLI's note comes after 3 s
        assert late.poll() is None, "an endpoint with new labels did not wait for etcd"
    finally:
        cli("lab", "etcd", "start")
        flow.close()
    out, err = late.communicate(timeout=60)
    assert late.returncode == 0 and "new labels need etcd" in err, err
    learn_endpoint(lab, "node2", "late")
    wait_for(
        lambda: ipcache_identity("node1", lab.ips["late"]) == lab.identities["late"],
        20, "node1's ipcache to hold the endpoint made while etcd was down",
    )  # fmt: skip
    wait_for(
        lambda: all(_link_state(n) == "ok" for n in ("node1", "node2", "node3")),
        30, "every node to reach etcd again",
    )  # fmt: skip
    revision = int(cli("policy", "import", str(HERE / "policy.yaml"), node="node3").split()[-1])
    wait_for(
        lambda: all(n["policy_revision"] == revision for n in lab_status()["nodes"]),
        30, f"policy revision {revision} in force on every node",
    )  # fmt: skip
    # frontend2's address reached node2's ipcache when etcd came back (native routing needs it)
    url = f"http://{backend}:8080/public/back"
    wait_for(lambda: lab.curl("node3", "frontend2", url) == "200", 20, "frontend2 -> backend")


def _link(node: str) -> dict:
    return json.loads(cli("status", "-o", "json", node=node))["cluster"]


def _link_state(node: str) -> str:
    return _link(node)["state"]


def test_tracked_packets_from_another_node_skip_the_destination_node_s_stack(lab):
    """Host routing across nodes: once the destination's hooks track a flow, its packets from
    another node are judged at the tunnel (or underlay) device and go straight into the pod's
    namespace; only the SYN goes through node2's stack and the pod's veth. With legacy routing
    all of them do."""
    reader, backend = lab.ips["reader"], lab.ips["backend"]

    def post() -> str:  # two megabytes from reader (node3) to backend:9090 (L3/L4 only)
        out = cli(
            "endpoint", "exec", "reader", "--", "sh", "-c",
            "head -c 2000000 /dev/zero | curl -s -o /dev/null -w %{http_code} -m 10 "
            f"--data-binary @- http://{backend}:9090/",
            node="node3", check=False, timeout=40,
        )  # fmt: skip
        return out.strip()[-3:]

    veth = backend_veth(backend)
    with forward_counter(reader, backend, netns="l7lab-node2", both_ways=False) as forwarded:
        sent = tx_packets(veth, "l7lab-node2")
        assert post() == "201"
        by_bpf = forwarded()
        through_veth = tx_packets(veth, "l7lab-node2") - sent
    from l7proxy.lab import state

    node2_pins = state.BPF_PIN_ROOT / "lab-node2"
    with (
        host_routing(node2_pins, on=False),
        forward_counter(reader, backend, netns="l7lab-node2", both_ways=False) as forwarded,
    ):
        sent = tx_packets(veth, "l7lab-node2")
        assert post() == "201"
        by_stack = forwarded()
        through_veth_legacy = tx_packets(veth, "l7lab-node2") - sent
    assert by_bpf <= 3 < 10 < by_stack, (by_bpf, by_stack)
    # The host side of the pod's veth sent a handful (the SYN, a neighbour probe): the rest
    # entered the pod by the peer redirect; through the stack, all of it went that way.
    assert through_veth <= 5 < 10 < through_veth_legacy, (through_veth, through_veth_legacy)


def backend_veth(ip: str) -> str:
    """The host-side veth, in node2's namespace, of the pod holding ip (its /32 route)."""
    out = subprocess.run(
        ["ip", "-n", "l7lab-node2", "-o", "route", "get", ip],
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[out.index("dev") + 1]


def test_established_cross_node_flow_survives_agent_restarts(lab):
    """reader (node3) keeps one connection to backend (node2) while both nodes' agents are
    SIGKILLed and started again: the pinned programs and maps, the VXLAN device and the routes
    stay, and the restarted agents' setup leaves them as they are."""
    flow = KeepAlive("node3", "reader", lab.ips["backend"], 9090)
    try:
        assert flow.ask("/before") == "200"
        cli("lab", "node", "stop", "node2")
        cli("lab", "node", "stop", "node3")
        assert flow.ask("/agents-down") == "200"
        cli("lab", "node", "start", "node2")
        cli("lab", "node", "start", "node3")
        assert flow.ask("/agents-back") == "200"
    finally:
        flow.close()
    # and new connections work after the restart
    assert lab.curl("node3", "reader", f"http://{lab.ips['backend']}:8080/public/n") == "200"


def test_a_removed_node_s_pods_are_dropped_not_tunnelled(lab):
    """Last in the module: node3's agent is killed and its lease expires; node1 forgets node3
    (nodes map, ipcache entries with node3 as tunnel endpoint, the route to its pod CIDR) and
    drops traffic to its pods instead of sending it to a stale tunnel, while node3's own
    datapath (pinned) still serves the pod locally. The deletes reach node1 through two
    watches at once (nodes and ipcache: one lease), the race that once left node3 behind."""
    _endpoint(lab, "node3", "web3", "app=web3")
    web3 = lab.ips["web3"]
    node3 = lab.nodes["node3"]
    lab.servers.append(in_pod("node3", "web3", sys.executable, str(HERE / "servers.py"), "8080"))
    wait_for(lambda: lab.curl("node1", "other", f"http://{web3}:8080/") == "200", 20, "web3")
    assert node3["underlay_ip"] in remote_view("node1")[0]
    assert node3["underlay_ip"] in remote_view("node1", ("ipcache6",))[1]  # its IPv6 pods
    cli("lab", "node", "stop", "node3")
    wait_for(
        lambda: "node3" not in {n["name"] for n in lab.status()["nodes"]},
        30,
        "node3's lease to expire",
    )
    wait_for(lambda: not any(node3["underlay_ip"] in s for s in remote_view("node1")), 10,
             "node1's maps to forget node3")  # fmt: skip
    assert lab.curl("node1", "other", f"http://{web3}:8080/", wait=2) == "000"
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
    else:  # no route for node3's pod CIDR any more: the cluster CIDR's catch-all is unreachable
        route = subprocess.run(["ip", "-n", "l7lab-node1", "route", "get", web3],
                               capture_output=True, text=True)  # fmt: skip
        assert route.returncode != 0 and "No route to host" in route.stderr, route
    link = json.loads(cli("status", "-o", "json", node="node1"))["cluster"]
    assert "node3" not in link["remote_nodes"] and not any(link["watch_errors"].values()), link
    # the pod itself still answers on its node: only the cluster forgot it
    assert lab.host_curl("l7lab-node3", f"http://{web3}:8080/") == "200"
