"""The agent through its CLI: endpoints on real namespaces, identities, the policy repository,
persistence across restarts, status and metrics. BPF is off here (tests/e2e/test_agent_*.py
with the datapath cover kernel enforcement)."""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
import threading
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
L3L4 = str(REPO / "demo" / "sw_l3_l4_policy.yaml")
L7 = str(REPO / "demo" / "sw_l3_l4_l7_policy.yaml")


def _pool() -> str:
    return free_pool()


@pytest.fixture
def agent():
    with AgentProcess(pool=_pool()) as a:
        yield a


def ok(a: AgentProcess, *args: str) -> str:
    r = a.cli(*args)
    assert r.returncode == 0, f"l7proxy {' '.join(args)} failed: {r.stderr}\n{a.log()}"
    return r.stdout


def ns_run(netns: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", netns, *args], capture_output=True, text=True)


def test_endpoint_create_list_delete_with_real_namespaces(agent):
    out = ok(agent, "endpoint", "create", "deathstar", "--labels", "org=empire,class=deathstar")
    assert "created" in out
    ok(agent, "endpoint", "create", "xwing", "--labels", "org=alliance,class=xwing")
    eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
    assert set(eps) == {"deathstar", "xwing"}
    star, xwing = eps["deathstar"], eps["xwing"]
    router = agent.pool.split("/")[0].rsplit(".", 1)[0] + ".1"
    assert star["ip"] != xwing["ip"] and star["identity"] != xwing["identity"]
    assert "k8s:org=empire" in star["labels"]
    assert "k8s:io.kubernetes.pod.namespace=default" in star["labels"]
    assert star["netns"] == agent.prefix + "deathstar"
    routes = ns_run(star["netns"], "ip", "-4", "route").stdout
    assert f"default via {router} dev eth0" in routes
    assert f"{star['ip']}/32" in ns_run(star["netns"], "ip", "-4", "addr", "show", "eth0").stdout

    # Real traffic between the two namespaces, through the host's routes.
    server = subprocess.Popen(
        ["ip", "netns", "exec", star["netns"], "python3", "-c", ECHO, star["ip"], "80"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout.readline().strip() == "listening"
        r = ns_run(xwing["netns"], "python3", "-c", CLIENT, star["ip"], "80")
        assert r.stdout.strip() == f"echo from {xwing['ip']}", r.stderr
    finally:
        server.kill()
        server.wait()

    table = ok(agent, "endpoint", "list")
    assert table.splitlines()[0].split()[:3] == ["NAME", "IP", "IDENTITY"]
    ok(agent, "endpoint", "delete", "xwing")
    assert not Path(f"/var/run/netns/{xwing['netns']}").exists()
    assert subprocess.run(["ip", "link", "show", xwing["host_if"]], capture_output=True).returncode
    names = [e["name"] for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))]
    assert names == ["deathstar"]
    r = agent.cli("endpoint", "create", "deathstar", "--labels", "a=b")
    assert r.returncode == 1 and "already exists" in r.stderr


ECHO = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print("listening", flush=True)
    while True:
        c, addr = s.accept(); c.sendall(f"echo from {addr[0]}\\n".encode()); c.close()
    """
)
CLIENT = textwrap.dedent(
    """
    import socket, sys
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print(c.makefile().readline().strip())
    """
)


def test_user_given_ip_and_identity_sharing(agent):
    base = agent.pool.split("/")[0].rsplit(".", 1)[0]
    a = json.loads(
        ok(agent, "endpoint", "create", "a", "--labels", "app=web", "--ip", f"{base}.77/32")
        and ok(agent, "endpoint", "list", "-o", "json")
    )[0]
    assert a["ip"] == f"{base}.77"
    ok(agent, "endpoint", "create", "b", "--labels", "app=web")
    eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
    assert eps["a"]["identity"] == eps["b"]["identity"], "same labels, same identity"
    r = agent.cli("endpoint", "create", "c", "--labels", "app=x", "--ip", f"{base}.77")
    assert r.returncode == 1 and "already used" in r.stderr
    ids = json.loads(ok(agent, "identity", "list", "-o", "json"))
    web = [i for i in ids if "k8s:app=web" in i["labels"]]
    assert len(web) == 1 and sorted(web[0]["endpoints"]) == ["a", "b"]
    assert {i["id"] for i in ids} >= set(range(1, 11)), "reserved identities are listed"
    assert "reserved:world" in ok(agent, "identity", "list")


def test_policy_import_is_atomic_and_prints_revisions(agent, tmp_path):
    ok(agent, "endpoint", "create", "deathstar", "--labels", "org=empire,class=deathstar")
    assert ok(agent, "policy", "import", L3L4).strip() == "Revision: 1"
    ep = json.loads(ok(agent, "endpoint", "list", "-o", "json"))[0]
    assert ep["policy"] == {"ingress": True, "egress": False}

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: bad}\n"
        "spec:\n  endpointSelector: {matchLabels: {a: b}}\n  ingress:\n"
        '  - toPorts:\n    - ports:\n      - port: "99999"\n        protocol: XTP\n'
    )
    before = json.loads(ok(agent, "policy", "get", "-o", "json"))
    r = agent.cli("policy", "import", L7, str(bad))
    assert r.returncode == 1
    assert str(bad) in r.stderr and "nothing changed" in r.stderr
    after = json.loads(ok(agent, "policy", "get", "-o", "json"))
    assert after == before and after["revision"] == 1
    assert not after["policies"][0]["document"]["spec"]["ingress"][0]["toPorts"][0].get("rules")

    # Same name: the L7 version replaces the L3/L4 one.
    assert ok(agent, "policy", "import", L7).strip() == "Revision: 2"
    got = json.loads(ok(agent, "policy", "get", "-o", "json"))
    assert [p["key"] for p in got["policies"]] == ["cnp/default/deathstar-landing"]
    assert got["policies"][0]["document"]["spec"]["ingress"][0]["toPorts"][0]["rules"]
    assert "POST" in ok(agent, "policy", "get")

    r = agent.cli("policy", "delete", "no-such-policy")
    assert r.returncode == 1 and "no policy" in r.stderr
    out = ok(agent, "policy", "delete", "deathstar-landing")
    assert "deleted cnp/default/deathstar-landing" in out and "Revision: 3" in out
    assert json.loads(ok(agent, "policy", "get", "-o", "json"))["policies"] == []
    ep = json.loads(ok(agent, "endpoint", "list", "-o", "json"))[0]
    assert ep["policy"] == {"ingress": False, "egress": False}


def test_restart_keeps_endpoints_identities_and_policy(tmp_path):
    with AgentProcess(pool=_pool(), state_dir=tmp_path) as agent:
        ok(agent, "endpoint", "create", "tiefighter", "--labels", "org=empire,class=tiefighter")
        ok(agent, "policy", "import", L3L4)
        before = json.loads(ok(agent, "endpoint", "list", "-o", "json"))
        ids_before = json.loads(ok(agent, "identity", "list", "-o", "json"))

        # Traffic keeps flowing into the endpoint while the agent restarts.
        ep = before[0]
        server = subprocess.Popen(
            ["ip", "netns", "exec", ep["netns"], "python3", "-c", ECHO, ep["ip"], "7000"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "listening"
        failures, stop = [], threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    with socket.create_connection((ep["ip"], 7000), timeout=2) as c:
                        if not c.makefile().readline().startswith("echo from"):
                            failures.append("bad answer")
                except OSError as exc:
                    failures.append(str(exc))

        loader = threading.Thread(target=load)
        loader.start()
        try:
            agent.restart()
        finally:
            stop.set()
            loader.join()
            server.kill()
            server.wait()
        assert failures == []
        after = json.loads(ok(agent, "endpoint", "list", "-o", "json"))
        assert [(e["name"], e["ip"], e["identity"]) for e in after] == [
            (e["name"], e["ip"], e["identity"]) for e in before
        ]
        assert json.loads(ok(agent, "identity", "list", "-o", "json")) == ids_before
        assert json.loads(ok(agent, "policy", "get", "-o", "json"))["revision"] == 1
        # A new endpoint with new labels gets a new number, never a reused one.
        ok(agent, "endpoint", "create", "xwing", "--labels", "org=alliance")
        xwing = [
            e
            for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))
            if e["name"] == "xwing"
        ]
        assert xwing[0]["identity"] not in {i["id"] for i in ids_before}


def test_status_and_metrics_report_counts_and_revision(agent):
    ok(agent, "endpoint", "create", "deathstar", "--labels", "org=empire,class=deathstar")
    ok(agent, "endpoint", "create", "tiefighter", "--labels", "org=empire,class=tiefighter")
    ok(agent, "policy", "import", L7)
    status = json.loads(ok(agent, "status", "-o", "json"))
    assert status["counts"]["endpoints"] == 2 and status["policy_revision"] == 1
    assert status["parts"]["datapath"]["state"] == "disabled"
    assert status["parts"]["store"]["state"] == "ok"
    text = ok(agent, "status")
    assert "Policy revision: 1" in text and "Endpoints:       2" in text
    metrics = ok(agent, "metrics")
    assert "endpoint_count 2" in metrics
    assert "policy_change_total 1" in metrics
    assert f"identity_count {status['counts']['identities']}" in metrics
    # One redirect entry per empire identity (deathstar and tiefighter) on port 80.
    assert 'proxy_redirects{protocol="http"} 2' in metrics
    # The admin port serves the same metrics plus health and policy.
    host, port = status["parts"]["admin"]["detail"].rsplit(":", 1)
    import urllib.request

    body = urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5).read().decode()
    assert "endpoint_count 2" in body
    assert urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=5).status == 200
    pol = json.loads(urllib.request.urlopen(f"http://{host}:{port}/policy", timeout=5).read())
    assert pol["revision"] == 1 and pol["policies"] == ["cnp/default/deathstar-landing"]


def test_cli_without_agent_says_how_to_start_it(tmp_path):
    import os
    import sys

    env = {**os.environ, "L7PROXY_SOCKET": str(tmp_path / "none.sock")}
    r = subprocess.run(
        [sys.executable, "-m", "l7proxy", "status"], capture_output=True, text=True, env=env
    )
    assert r.returncode == 1 and "l7proxy agent" in r.stderr


def test_policy_trace_against_the_live_state(agent):
    for name, labels in (
        ("deathstar", "org=empire,class=deathstar"),
        ("tiefighter", "org=empire,class=tiefighter"),
        ("xwing", "org=alliance,class=xwing"),
    ):
        ok(agent, "endpoint", "create", name, "--labels", labels)
    ok(agent, "policy", "import", L7)

    def trace(src: str, *extra: str) -> dict:
        out = ok(agent, "policy", "trace", "--src-endpoint", src, "--dst-endpoint", "deathstar",
                 "--dport", "80", *extra, "-o", "json")  # fmt: skip
        return json.loads(out)

    assert trace("xwing")["verdict"] == "DENIED"
    assert trace("tiefighter", "--http", "POST", "/v1/request-landing")["verdict"] == "ALLOWED"
    put = trace("tiefighter", "--http", "PUT", "/v1/exhaust-port")
    assert put["verdict"] == "DENIED" and put["ingress"]["verdict"] == "ALLOWED"
    r = agent.cli("policy", "trace", "--src-endpoint", "nobody", "--dst-endpoint", "deathstar",
                  "--dport", "80")  # fmt: skip
    assert r.returncode == 2 and "nobody" in r.stderr


def test_stored_policy_that_no_longer_compiles_is_reported_not_fatal(tmp_path):
    import sqlite3

    with AgentProcess(pool=_pool(), state_dir=tmp_path) as agent:
        ok(agent, "endpoint", "create", "deathstar", "--labels", "org=empire,class=deathstar")
        ok(agent, "policy", "import", L7)
        agent.stop()
        # As if a newer engine rejected what an older one stored.
        db = sqlite3.connect(tmp_path / "state.db")
        db.execute("UPDATE policies SET text = replace(text, 'protocol: TCP', 'protocol: XTP')")
        db.commit()
        db.close()
        agent.start()
        status = json.loads(ok(agent, "status", "-o", "json"))
        assert status["parts"]["policy"]["state"] == "error"
        assert "XTP" in status["parts"]["policy"]["detail"]
        assert status["policy_revision"] == 1
        out = ok(agent, "policy", "delete", "--all")
        assert "Revision: 2" in out
        status = json.loads(ok(agent, "status", "-o", "json"))
        assert status["parts"]["policy"] == {"state": "ok", "detail": "revision 2 in force"}


def test_sweep_stale_removes_only_old_leftovers_of_dead_runs():
    import time
    import uuid

    from tests.agent_runner import sweep_stale

    root = Path("/sys/fs/bpf/l7proxy")
    root.mkdir(exist_ok=True)
    left = root / f"l7a{uuid.uuid4().hex[:5]}"
    left.mkdir()
    ns = left.name + "-ghost"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        only = {left.name}  # never touch what parallel runs own
        assert sweep_stale(names=only) == [], "a fresh directory may be a restarting agent's"
        assert left.exists()
        removed = sweep_stale(now=time.time() + 3600, names=only)
        assert str(left) in removed
        assert not left.exists() and not Path("/var/run/netns", ns).exists()
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        if left.exists():
            left.rmdir()


def test_worker_resends_flows_a_stopping_agent_did_not_acknowledge(tmp_path):
    """The worker's flows channel across an agent restart: flows written into the socket of an
    agent that stops without reading them, and flows made while no agent listens, all reach the
    next agent (the worker keeps what was not acknowledged)."""
    import asyncio
    from types import SimpleNamespace

    from l7proxy.agent.api import ApiServer
    from l7proxy.agent.proxy_worker_process import Uplink, send_uplink
    from l7proxy.metrics import ProxyMetrics

    path = tmp_path / "agent.sock"

    async def until(cond, what: str, timeout: float = 20.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, what
            await asyncio.sleep(0.02)

    async def main() -> list[int]:
        connected, release = asyncio.Event(), asyncio.Event()

        async def stopping_agent(reader, writer) -> None:
            await reader.readline()  # the proxy.flows request; then it never reads again
            connected.set()
            await release.wait()
            writer.close()  # unread flows in the socket buffer are discarded

        old = await asyncio.start_unix_server(stopping_agent, str(path))
        view = SimpleNamespace(flows=Uplink(), metrics=SimpleNamespace(proxy=ProxyMetrics()))
        task = asyncio.create_task(send_uplink(view, str(path)))
        await asyncio.wait_for(connected.wait(), 20)
        for n in range(10):
            view.flows.ingest({"n": n})
        await until(lambda: len(view.flows.inflight) >= 10, "the worker wrote the flows")
        old.close()
        path.unlink()
        release.set()  # the old agent goes away without having read them
        for n in range(10, 20):  # while no agent listens
            view.flows.ingest({"n": n})
        got: list[int] = []
        new = ApiServer()
        new.sink(
            "proxy.flows", lambda args, item: got.extend([item["flow"]["n"]] * ("flow" in item))
        )
        await new.start(path)
        try:
            await until(lambda: len(set(got)) >= 20, f"all flows reach the new agent: {got}")
            await until(lambda: not view.flows.inflight, "the new agent acknowledged them")
        finally:
            task.cancel()
            await new.close()
        return got

    got = asyncio.run(main())
    assert sorted(set(got)) == list(range(20)) and len(got) == 20, got


def test_follow_against_a_stuck_agent_is_an_error_not_a_hang(tmp_path):
    """A streaming call (observe --follow) must hear from the agent within the client's
    timeout; only after the agent's first line may the stream idle."""
    import time

    from l7proxy.agent.client import AgentError, Client

    path = str(tmp_path / "stuck.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()  # accepts (the kernel does) but never answers
    try:
        started = time.monotonic()
        with pytest.raises(AgentError, match="did not answer observe.follow"):
            next(Client(path, timeout=1.0).stream("observe.follow", filter={}, last=0))
        assert time.monotonic() - started < 10
    finally:
        srv.close()
