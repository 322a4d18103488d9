"""NodePort from outside the cluster on a 2-node lab, tunnel and native routing (docs/services.md):
a service with 3 backends on 2 nodes reached from an "external" namespace on the underlay
through either node's port, with SNAT and with DSR, TCP and UDP; answers come from the node's
address and port; a backend the policy closes to the outside stays closed through the NodePort.

web1, web2 and guarded run on node1, web3 on node2; the client is 10.251.0.50 on the underlay
bridge (no cgroup hooks matter: it connects to node IPs, which the socket LB never translates).

The same lab checks the service's VIP from inside the cluster (socket LB at connect()): from a
client pod on each node (client1, client2) and from each node's host namespace, to backends on
both nodes across the tunnel or native routes.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from redirect_bpf import nodeport_structs as NS
from redirect_bpf.maps import open_pinned_maps, release
from redirect_bpf.nodeport import gc_closed
from tests.lab.conftest import HERE, REPO, Lab, _endpoint, cli, in_pod, wait_for

pytestmark = [pytest.mark.root, pytest.mark.bpf]

EXT_NS, EXT_LINK, EXT_IP = "l7lab-ext", "l7lab-ext0", "10.251.0.50"
NODE1, NODE2 = "10.251.0.11", "10.251.0.12"
NODE1_PINS = Path("/sys/fs/bpf/l7proxy/lab-node1")  # l7proxy/lab/lifecycle.py
WEB = {"web1", "web2", "web3"}
CLIENTS = {"node1": "client1", "node2": "client2"}  # a client pod on each node (socket LB)
GUARDED_POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: guarded}
spec:
  endpointSelector: {matchLabels: {app: guarded}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: nobody}}]
"""
SERVICES = [  # name, frontend, selector, target port, node port, extra
    ("web", "10.96.0.10:80/TCP", "app=web", "8080", "30080", ("--lb", "maglev")),
    ("web-dsr", "10.96.0.11:80/TCP", "app=web", "8080", "30081", ("--lb", "maglev", "--dsr")),
    ("names", "10.96.0.53:53/UDP", "app=web", "5353", "30053", ()),
    ("names-dsr", "10.96.0.54:53/UDP", "app=web", "5353", "30054", ("--dsr",)),
    ("guarded", "10.96.0.12:80/TCP", "app=guarded", "8080", "30082", ()),
]


def outside(kind: str, host: str, port: int, n: int, sport: int = 0) -> list[dict]:
    """n requests from the external namespace (tests/lab/outside_client.py)."""
    cmd = ["ip", "netns", "exec", EXT_NS, sys.executable, str(HERE / "outside_client.py"),
           kind, host, str(port), str(n), *(("--sport", str(sport)) if sport else ())]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=10 + 3 * n, check=True)
    return [json.loads(line) for line in out.stdout.splitlines()]


def _external_namespace() -> None:
    run = lambda *a: subprocess.run(a, check=True)  # noqa: E731
    run("ip", "netns", "add", EXT_NS)
    run("ip", "link", "add", EXT_LINK, "type", "veth", "peer", "name", "eth0", "netns", EXT_NS)
    run("ip", "link", "set", EXT_LINK, "master", "l7lab0", "up")
    for args in (("addr", "add", f"{EXT_IP}/24", "dev", "eth0"), ("link", "set", "eth0", "up"),
                 ("link", "set", "lo", "up")):  # fmt: skip
        run("ip", "-n", EXT_NS, *args)


@pytest.fixture(scope="module", params=["tunnel", "native"])
def np_lab(request, tmp_path_factory):
    cli("lab", "down")
    lab = Lab(request.param)
    try:
        cli("lab", "up", "--nodes", "2", "--routing", lab.routing, "--lease-ttl", "5", timeout=240)
        for node, name, labels in (("node1", "web1", "app=web"), ("node1", "web2", "app=web"),
                                   ("node2", "web3", "app=web"),
                                   ("node1", "guarded", "app=guarded")):  # fmt: skip
            _endpoint(lab, node, name, labels)
            server = str(HERE / "named_server.py")
            lab.servers.append(in_pod(node, name, sys.executable, server, name, "8080", "5353"))
        for node, name in CLIENTS.items():
            _endpoint(lab, node, name, "app=client")
        _external_namespace()
        policy = tmp_path_factory.mktemp("np") / "guarded.yaml"
        policy.write_text(GUARDED_POLICY)
        cli("policy", "import", str(policy), node="node1")
        for name, frontend, selector, target, node_port, extra in SERVICES:
            cli("service", "create", name, "--vip", frontend, "--selector", selector,
                "--target-port", target, "--node-port", node_port, *extra, node="node1")  # fmt: skip

        def ready(node: str) -> bool:
            svc = json.loads(cli("service", "get", "web", node=node))
            return len(svc["endpoints"]) == 3

        wait_for(lambda: ready("node1") and ready("node2"), 30, "3 web backends on both nodes")
        wait_for(
            lambda: all(r["ok"] for r in outside("tcp", NODE2, 30080, 1)),
            30,
            "the servers answering through the NodePort",
        )
        yield lab
    finally:
        for server in lab.servers:
            server.kill()
            server.wait(10)
        subprocess.run(["ip", "netns", "del", EXT_NS], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", EXT_LINK], check=False, capture_output=True)
        cli("lab", "down", timeout=120)


def test_status_names_the_nodeport_device(np_lab):
    for node, ip in (("node1", NODE1), ("node2", NODE2)):
        detail = json.loads(cli("status", "-o", "json", node=node))["parts"]["services"]["detail"]
        assert f"NodePort on eth0 ({ip})" in detail, detail


def _served(results: list[dict]) -> list[tuple[str, str]]:
    """(backend name, the client address the backend saw) per answer; all must have answered."""
    failed = [r for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:2]}"
    return [tuple(r["body"].split()) for r in results]


def _nodeport_flows(node: str, service: str) -> float:
    """l7proxy_service_flows_total{kind="nodeport"} of a service on a node."""
    want = f'l7proxy_service_flows_total{{namespace="default",service="{service}",kind="nodeport"}}'
    for line in cli("metrics", node=node).splitlines():
        sample, _, value = line.rpartition(" ")
        if sample == want:
            return float(value)
    raise AssertionError(f"no {want} on {node}")


@pytest.mark.parametrize("node_ip", [NODE1, NODE2])
def test_nodeport_snat_reaches_backends_on_both_nodes(np_lab, node_ip):
    node = "node1" if node_ip == NODE1 else "node2"
    before = _nodeport_flows(node, "web")
    served = _served(outside("tcp", node_ip, 30080, 30))
    assert {name for name, _ in served} == WEB, Counter(served)
    # each connection is one new NodePort flow, counted where it entered
    assert _nodeport_flows(node, "web") - before == 30
    local = {"web1", "web2"} if node_ip == NODE1 else {"web3"}
    for name, seen in set(served):
        # a backend on the node the client entered sees the client; one on the other node sees
        # the entry node (SNAT: the answer must come back through it)
        assert seen == (EXT_IP if name in local else node_ip), (name, seen)


def test_nodeport_dsr_keeps_the_client_address(np_lab):
    served = _served(outside("tcp", NODE2, 30081, 30))
    assert {name for name, _ in served} == WEB
    # every backend saw the client itself: the far node answered it directly, as NODE2:30081
    assert {seen for _, seen in served} == {EXT_IP}


@pytest.mark.parametrize("port", [30053, 30054], ids=["snat", "dsr"])
def test_udp_nodeport_answers_come_from_the_node_port(np_lab, port):
    results = outside("udp", NODE2, port, 30)
    served = _served(results)
    assert {name for name, _ in served} == WEB, Counter(served)
    # recvfrom() names the real source of each answer: always the node and its port, also for
    # the backends on node1 (DSR: node1 rewrote the source of its pod's answer)
    assert {tuple(r["peer"]) for r in results} == {(NODE2, port)}
    if port == 30054:
        assert {seen for _, seen in served} == {EXT_IP}


def test_every_node_picks_the_same_backend_for_a_flow(np_lab):
    """Maglev over the client's address and port: entering by node1 or node2, one backend."""
    for sport in (41001, 41002, 41003):
        first = _served(outside("tcp", NODE1, 30080, 1, sport=sport))[0][0]
        second = _served(outside("tcp", NODE2, 30080, 1, sport=sport))[0][0]
        assert first == second, sport


def test_policy_still_denies_the_backend_through_the_nodeport(np_lab):
    # the guarded pod accepts nobody from outside: through its own node (local DNAT, the
    # client's address: world) and through the other (SNAT/DSR: world or remote-node)
    for node_ip in (NODE1, NODE2):
        results = outside("tcp", node_ip, 30082, 1)
        assert not results[0]["ok"], node_ip
    guarded = np_lab.ips["guarded"]
    drops = [
        f
        for f in np_lab.flows("node1")
        if f["verdict"] == "DROPPED" and f["destination"].get("ip") == guarded
    ]
    assert drops, "node1 recorded no drop for the guarded backend"
    assert drops[-1].get("service") == "guarded"
    assert drops[-1]["l4"]["TCP"]["destination_port"] == 8080


def in_cluster(lab: Lab, node: str, pod: str | None, *args: str) -> list[dict]:
    """tests/services/client.py in a pod (or, with None, the node's host namespace): every
    process on the machine is under the root cgroup the lab's socket LB is attached to."""
    module = (sys.executable, "-m", "tests.services.client", *args)
    if pod:
        out = cli("endpoint", "exec", pod, "--", *module, node=node, timeout=60)
    else:
        cmd = ["nsenter", f"--net=/var/run/netns/l7lab-{node}", "--", *module]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, check=True)
        out = out.stdout
    return [json.loads(line) for line in out.splitlines()]


SOURCES = [("node1", "client1"), ("node2", "client2"), ("node1", None), ("node2", None)]


@pytest.mark.parametrize(("node", "pod"), SOURCES, ids=["pod1", "pod2", "host1", "host2"])
def test_the_vip_from_pods_and_hosts_reaches_backends_on_both_nodes(np_lab, node, pod):
    """Socket LB at connect(): the VIP becomes a backend on this node or the other before the
    first packet, which then crosses the cluster datapath (tunnel or native) like any pod
    traffic; getpeername() still says the VIP, and UDP answers come from the VIP."""
    results = in_cluster(np_lab, node, pod, "tcp", "10.96.0.10", "80", "30")
    assert all(r["status"] == 200 for r in results), [r for r in results if r["status"] != 200]
    spread = Counter(r["backend"] for r in results)
    assert set(spread) == WEB, spread  # web1, web2 on node1 and web3 on node2
    assert {tuple(r["peer"]) for r in results} == {("10.96.0.10", 80)}  # getpeername4
    seen = {(r["backend"], r["seen"]) for r in results}
    if pod:  # no NAT on the way: every backend, local or remote, sees the pod itself
        assert {ip for _, ip in seen} == {np_lab.ips[pod]}, seen
    else:  # the host's own source: towards its pods the router address of its pod CIDR,
        # across the cluster its underlay address
        status = next(n for n in np_lab.status()["nodes"] if n["name"] == node)
        router = str(next(ipaddress.ip_network(status["pod_cidr"]).hosts()))
        local = {"web1", "web2"} if node == "node1" else {"web3"}
        expected = {(b, router if b in local else status["underlay_ip"]) for b in WEB}
        assert seen == expected, seen
    answers = in_cluster(np_lab, node, pod, "udp", "10.96.0.53", "53", "30")
    assert all(r["error"] is None for r in answers), [r for r in answers if r["error"]]
    assert set(Counter(r["backend"] for r in answers)) == WEB
    assert {tuple(r["source"]) for r in answers} == {("10.96.0.53", 53)}  # recvmsg4
    if pod:
        assert {r["seen"] for r in answers} == {np_lab.ips[pod]}


def test_a_direct_connection_reusing_a_nodeport_flows_tuple_gets_its_own_answers(np_lab):
    """A client that reached a local backend through node1's port, then connects straight to
    that backend's address and port from the same source port: the node-port flow's reverse
    entry (backend:8080 -> client:port, rewritten to node1:30080) must not rewrite the direct
    connection's answers (before the fix its SYN-ACK came from node1:30080 and the connect()
    failed)."""
    sport, name = next(
        (p, served[0])
        for p in range(45001, 45100)
        if (served := _served(outside("tcp", NODE1, 30080, 1, sport=p))[0])[0] in {"web1", "web2"}
    )
    pod_ip = np_lab.ips[name]
    route = ("ip", "-n", EXT_NS, "route", "replace", f"{pod_ip}/32", "via", NODE1)
    subprocess.run(route, check=True)
    try:
        direct = outside("tcp", pod_ip, 8080, 1, sport=sport)
        assert direct[0]["ok"], direct
        assert direct[0]["peer"] == [pod_ip, 8080]
        assert direct[0]["body"].split()[0] == name
        # and the node port works again on the same tuple afterwards
        assert _served(outside("tcp", NODE1, 30080, 1, sport=sport))[0][0] in WEB
    finally:
        subprocess.run(("ip", "-n", EXT_NS, "route", "del", f"{pod_ip}/32"), check=False)


def test_a_closed_nodeport_flow_is_marked_and_collected(np_lab):
    """A TCP connection through node1's port that the client closed: its np_ct entry is
    marked closing (the client's FIN), and the GC (the agent sweeps every 10 s for flows idle
    10 s; here at once) removes it with its answers' mapping (np_rev)."""
    sport = 44001
    _served(outside("tcp", NODE1, 30080, 1, sport=sport))
    names = ("np_ct", "np_rev", "np_config")
    maps = open_pinned_maps(NODE1_PINS, {n: NS.MAPS[n] for n in names})
    try:
        key = NS.Tuple(NS.be32(EXT_IP), NS.be32(NODE1), NS.be16(sport), NS.be16(30080), 6)
        ct = maps["np_ct"].get(key)
        assert ct is not None and ct.flags & NS.NP_CT_CLOSING, ct and ct.flags
        if ct.flags & NS.NP_CT_SNAT:
            rkey = NS.Tuple(ct.backend_ip, NS.be32(NODE1), ct.backend_port, ct.nat_port, 6)
        else:
            rkey = NS.Tuple(ct.backend_ip, key.saddr, ct.backend_port, key.sport, 6)
        assert maps["np_rev"].get(rkey) is not None
        assert gc_closed(maps, time.monotonic_ns(), idle_ns=0) >= 1
        assert maps["np_ct"].get(key) is None and maps["np_rev"].get(rkey) is None
    finally:
        release(maps, (), None)


def _hold(node_ip: str, port: int, sport: int) -> subprocess.Popen:
    """An outside TCP connection from `sport`, open and idle until a line is written to it."""
    cmd = ["ip", "netns", "exec", EXT_NS, sys.executable, str(HERE / "outside_client.py"),
           "hold", node_ip, str(port), "1", "--sport", str(sport)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline()) == {"connected": 1}
    return proc


def test_a_deleted_backend_loses_its_nodeport_flows_at_once(np_lab):
    """Last (it deletes web3): a UDP flow that NodePort tracked to web3 goes to another
    backend with its next datagram once web3 left the service; a TCP connection to web3
    through node1's port (SNAT) and through node2's (local) is reset by its next packet
    instead of being blackholed."""
    sport = next(
        p
        for p in range(42001, 42100)
        if _served(outside("udp", NODE1, 30053, 1, sport=p))[0][0] == "web3"
    )
    assert _served(outside("udp", NODE1, 30053, 1, sport=sport))[0][0] == "web3"  # tracked
    # Maglev over the client's address and port: this port reaches web3 through either node
    tcp_port = next(
        p
        for p in range(43001, 43100)
        if _served(outside("tcp", NODE1, 30080, 1, sport=p))[0][0] == "web3"
    )
    held = [_hold(ip, 30080, tcp_port) for ip in (NODE1, NODE2)]
    try:
        cli("endpoint", "delete", "web3", node="node2")
        wait_for(
            lambda: len(json.loads(cli("service", "get", "names", node="node1"))["endpoints"]) == 2,
            30,
            "web3 gone from the service on node1",
        )
        again = _served(outside("udp", NODE1, 30053, 3, sport=sport))
        assert {name for name, _ in again} <= {"web1", "web2"}, again
        for proc in held:  # a request on the idle connection: reset, not a 5 s timeout
            proc.stdin.write("go\n")
            proc.stdin.flush()
            answer = json.loads(proc.stdout.readline())
            assert answer["error"] == "ConnectionResetError" and answer["seconds"] < 3, answer
    finally:
        for proc in held:
            proc.kill()
            proc.wait()
