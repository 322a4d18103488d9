"""Real agents (no BPF; real namespaces, so root) in one cluster on a real etcd: the same
identity on every node, policy import on one node enforced and shown on all, a bad policy
refused with file/line/field and no node changing, an etcd outage, and a SIGKILLed agent that
comes back with its lease, pod CIDR and identities."""

from __future__ import annotations

import contextlib
import json
import signal
import time

import pytest

from tests.agent_runner import AgentProcess, free_pool
from tests.conftest import REPO

pytestmark = pytest.mark.root

L3L4 = str(REPO / "demo" / "sw_l3_l4_policy.yaml")
L7 = str(REPO / "demo" / "sw_l3_l4_l7_policy.yaml")


def ok(agent, *args, timeout: float = 60) -> str:
    r = agent.cli(*args, timeout=timeout)
    assert r.returncode == 0, f"{args}: {r.stderr}\n{agent.log()}"
    return r.stdout


def until(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


@pytest.fixture
def cluster(etcd, tmp_path):
    from tests.cluster.conftest import run, wipe

    etcd.stop()
    etcd.start()
    run(wipe(etcd.url))
    cidr = free_pool()  # a /24 no route uses yet; each node leases a /26 of it
    agents = []

    def node(name: str, ttl: int = 3, state_dir=None) -> AgentProcess:
        agent = AgentProcess(
            pool="10.200.0.0/16",
            state_dir=state_dir,
            admin=False,
            extra_args=(
                "--kvstore", etcd.url, "--node-name", name, "--cluster-cidr", cidr,
                "--node-cidr-mask-size", "26", "--underlay-ip", "127.0.0.1",
                "--node-lease-ttl", str(ttl), "--identity-gc-interval", "3600",
            ),
        )  # fmt: skip
        agents.append(agent)
        return agent.start()

    yield node
    for agent in agents:
        with contextlib.suppress(Exception):
            agent.close()


def eps(agent) -> dict:
    return {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}


def test_identities_policy_and_status_agree_across_nodes(cluster, etcd, tmp_path):
    a, b = cluster("node1"), cluster("node2")
    ok(a, "endpoint", "create", "deathstar", "--labels", "org=empire,class=deathstar")
    ok(b, "endpoint", "create", "xwing", "--labels", "org=alliance,class=xwing")
    ok(b, "endpoint", "create", "deathstar2", "--labels", "org=empire,class=deathstar")
    ds_a, ds_b = eps(a)["deathstar"], eps(b)["deathstar2"]
    assert ds_a["identity"] == ds_b["identity"] >= 256
    assert eps(b)["xwing"]["identity"] != ds_a["identity"]
    # each node's pods come from its own leased pod CIDR
    st_a = json.loads(ok(a, "status", "-o", "json"))["cluster"]
    st_b = json.loads(ok(b, "status", "-o", "json"))["cluster"]
    assert st_a["pod_cidr"] != st_b["pod_cidr"]
    import ipaddress

    assert ipaddress.ip_address(ds_a["ip"]) in ipaddress.ip_network(st_a["pod_cidr"])
    # the other node's pods are in each node's ipcache, with their labels
    until(lambda: json.loads(ok(a, "status", "-o", "json"))["cluster"]["remote_endpoints"] == 2)

    assert ok(a, "policy", "import", L3L4).strip() == "Revision: 1"
    # node2 compiles and enforces the set it received
    until(lambda: eps(b)["deathstar2"]["policy"]["ingress"])
    got_a = json.loads(ok(a, "policy", "get", "-o", "json"))
    got_b = json.loads(ok(b, "policy", "get", "-o", "json"))
    assert got_a["policies"] == got_b["policies"] and got_b["revision"] == 1

    status = until(lambda: _status_at(a, 1))
    assert [n["name"] for n in status["nodes"]] == ["node1", "node2"]
    assert {n["pod_cidr"] for n in status["nodes"]} == {st_a["pod_cidr"], st_b["pod_cidr"]}
    assert all(n["underlay_ip"] == "127.0.0.1" and n["health"] == "ok" for n in status["nodes"])

    # a bad policy on node2: refused with file, line and field; no node changes
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\n"
        "spec:\n  endpointSelector: {matchLabels: {a: b}}\n  ingress:\n"
        '  - toPorts:\n    - ports:\n      - port: "99999"\n        protocol: XTP\n'
    )
    r = b.cli("policy", "import", L7, str(bad))
    assert r.returncode == 1 and "nothing changed" in r.stderr
    assert "bad.yaml:" in r.stderr and "port" in r.stderr
    time.sleep(0.5)
    for agent in (a, b):
        assert json.loads(ok(agent, "policy", "get", "-o", "json"))["revision"] == 1
    assert _status_at(a, 1)


def _status_at(agent, revision: int):
    st = json.loads(ok(agent, "cluster", "status", "-o", "json"))
    if st["revision"] == revision and all(n["policy_revision"] == revision for n in st["nodes"]):
        return st
    return None


def test_etcd_outage_then_recovery_without_restarts(cluster, etcd):
    a, b = cluster("node1", ttl=10), cluster("node2", ttl=10)
    ok(a, "endpoint", "create", "web1", "--labels", "app=web")
    ok(a, "policy", "import", L3L4)
    etcd.stop()
    until(lambda: json.loads(ok(a, "status", "-o", "json"))["cluster"]["state"] == "unreachable")
    t0 = time.monotonic()
    r = a.cli("policy", "import", L7)
    assert r.returncode == 1 and time.monotonic() - t0 < 5
    assert "needs the kvstore" in r.stderr and "unreachable" in r.stderr
    # known labels (node1 allocated app=web; node2 learned it through its watch): starts now
    ok(b, "endpoint", "create", "web2", "--labels", "app=web", timeout=20)
    assert eps(b)["web2"]["identity"] == eps(a)["web1"]["identity"]
    # new labels wait for etcd, then complete
    import subprocess
    import sys

    waiting = subprocess.Popen(
        [sys.executable, "-m", "l7proxy", "endpoint", "create", "db1", "--labels", "app=db"],
        env=b.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(2)
    assert waiting.poll() is None
    assert "app=db" in json.dumps(json.loads(ok(b, "status", "-o", "json"))["cluster"])
    etcd.start()
    out, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 0, err
    assert "new labels need etcd" in err and "db1 created" in out
    # both converge: node1 sees node2's two pods, policy import works again
    until(lambda: json.loads(ok(a, "status", "-o", "json"))["cluster"]["remote_endpoints"] == 2, 20)
    assert ok(a, "policy", "import", L7).strip() == "Revision: 2"
    until(lambda: json.loads(ok(b, "policy", "get", "-o", "json"))["revision"] == 2)


def test_sigkilled_agent_comes_back_with_its_lease_cidr_and_identities(cluster, tmp_path):
    state = tmp_path / "node1"
    state.mkdir()
    a, b = cluster("node1", ttl=15, state_dir=state), cluster("node2", ttl=15)
    ok(a, "endpoint", "create", "web1", "--labels", "app=web")
    before = json.loads(ok(a, "status", "-o", "json"))["cluster"]
    ident = eps(a)["web1"]["identity"]
    a.stop(signal.SIGKILL)
    a.start()
    after = json.loads(ok(a, "status", "-o", "json"))["cluster"]
    assert (after["lease"], after["pod_cidr"]) == (before["lease"], before["pod_cidr"])
    assert eps(a)["web1"]["identity"] == ident
    ok(b, "endpoint", "create", "web2", "--labels", "app=web")
    assert eps(b)["web2"]["identity"] == ident
    st = json.loads(ok(b, "status", "-o", "json"))["cluster"]
    assert st["remote_nodes"] == ["node1"] and st["remote_endpoints"] == 1


def test_same_new_labels_on_two_agents_at_once_get_one_id(cluster):
    import subprocess
    import sys

    a, b = cluster("node1"), cluster("node2")
    for i in range(3):
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "l7proxy",
                    "endpoint",
                    "create",
                    f"{agent_name}-{i}",
                    "--labels",
                    f"app=race{i}",
                ],
                env=agent.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for agent_name, agent in (("a", a), ("b", b))
        ]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        assert eps(a)[f"a-{i}"]["identity"] == eps(b)[f"b-{i}"]["identity"]
    ids = {eps(a)[f"a-{i}"]["identity"] for i in range(3)}
    assert len(ids) == 3


def test_a_node_that_ran_alone_takes_the_clusters_policy_set_when_it_joins(cluster, tmp_path):
    state = tmp_path / "alone"
    state.mkdir()
    with AgentProcess(pool=free_pool(), state_dir=state, admin=False) as alone:
        assert ok(alone, "policy", "import", L3L4).strip() == "Revision: 1"
    b = cluster("node2")
    ok(b, "policy", "import", L7)
    ok(b, "policy", "import", L7)  # cluster revision 2
    a = cluster("node1", state_dir=state)
    got = json.loads(ok(a, "policy", "get", "-o", "json"))
    assert got == json.loads(ok(b, "policy", "get", "-o", "json")) and got["revision"] == 2
    assert got["policies"][0]["document"]["spec"]["ingress"][0]["toPorts"][0]["rules"]  # L7's
