"""The agent with the BPF datapath and the node proxy, through the CLI: kernel drops, L7 verdicts,
`observe` (filters, json, follow), metrics, and a restart under load while the kernel keeps
enforcing."""

from __future__ import annotations

import calendar
import contextlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool, ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[2]
L3L4 = str(REPO / "demo" / "sw_l3_l4_policy.yaml")
L7 = str(REPO / "demo" / "sw_l3_l4_l7_policy.yaml")


class Galaxy:
    """deathstar (HTTP on :80), tiefighter and xwing, made through the agent's CLI."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        for name, labels in (
            ("deathstar", "org=empire,class=deathstar"),
            ("tiefighter", "org=empire,class=tiefighter"),
            ("xwing", "org=alliance,class=xwing"),
        ):
            ok(agent, "endpoint", "create", name, "--labels", labels)
        self.eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        self.star = self.eps["deathstar"]["ip"]
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "deathstar", sys.executable, "-m",
             "demo.deathstar", self.star],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert self.server.stdout.readline().strip() == "listening"

    def curl(self, ship: str, method: str, path: str, timeout: float = 1.5) -> str:
        r = subprocess.run(
            ["ip", "netns", "exec", self.agent.prefix + ship, "curl", "-s", "-m", str(timeout),
             "-X", method, "-o", "/dev/null", "-w", "%{http_code}", f"http://{self.star}{path}"],
            capture_output=True,
            text=True,
        )  # fmt: skip
        return "timeout" if r.returncode == 28 else r.stdout

    def close(self) -> None:
        self.server.kill()
        self.server.wait()


@contextlib.contextmanager
def running_galaxy(*extra_args: str):
    """An agent with BPF (and `extra_args`) and the Galaxy made through it; all gone after."""
    agent = AgentProcess(pool=free_pool(), bpf=True, extra_args=extra_args)
    agent.start()
    g = None
    try:
        g = Galaxy(agent)
        yield g
    finally:
        if g is not None:
            g.close()
        agent.close()
        assert not agent.pin_dir.exists()


@pytest.fixture
def galaxy():
    with running_galaxy() as g:
        yield g


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_kernel_drops_l7_verdicts_observe_and_metrics(galaxy):
    agent = galaxy.agent
    status = json.loads(ok(agent, "status", "-o", "json"))
    assert status["parts"]["datapath"]["state"] == "ok"
    assert "3 endpoints attached" in status["parts"]["datapath"]["detail"]
    assert status["parts"]["proxy"]["state"] == "ok"

    assert galaxy.curl("xwing", "POST", "/v1/request-landing") == "200"
    ok(agent, "policy", "import", L3L4)
    assert galaxy.curl("xwing", "POST", "/v1/request-landing") == "timeout"
    assert galaxy.curl("tiefighter", "POST", "/v1/request-landing") == "200"
    ok(agent, "policy", "import", L7)
    assert galaxy.curl("tiefighter", "PUT", "/v1/exhaust-port") == "403"
    assert galaxy.curl("tiefighter", "POST", "/v1/request-landing") == "200"

    # The kernel's events come through the ring buffer: wait for both kinds, bounded.
    def both_kinds() -> bool:
        kinds = {f["event_type"] for f in agent.client.call("observe", last=500)}
        return {"L3_L4", "L7"} <= kinds

    wait_for(both_kinds, "kernel and proxy flows in the log")

    # One stream: kernel L3/L4 drops and proxy L7 flows, in Hubble's JSON shape.
    flows = [
        json.loads(line)
        for line in ok(agent, "observe", "--last", "500", "-o", "json").splitlines()
    ]
    kernel_drops = [f for f in flows if f["event_type"] == "L3_L4" and f["verdict"] == "DROPPED"]
    assert kernel_drops and all(f["drop_reason_desc"] == "POLICY_DENIED" for f in kernel_drops)
    drop = kernel_drops[0]
    assert drop["source"]["pod_name"] == "xwing" and drop["destination"]["pod_name"] == "deathstar"
    assert drop["source"]["identity"] == galaxy.eps["xwing"]["identity"]
    assert "k8s:class=xwing" in drop["source"]["labels"]
    assert drop["l4"]["TCP"]["destination_port"] == 80 and drop["traffic_direction"] == "INGRESS"
    l7 = [f for f in flows if f["event_type"] == "L7"]
    denied = [f for f in l7 if f["verdict"] == "DROPPED"]
    assert len(denied) == 1 and denied[0]["l7"]["http"]["code"] == 403
    assert denied[0]["l7"]["http"]["method"] == "PUT"
    assert denied[0]["source"]["identity"] == galaxy.eps["tiefighter"]["identity"]
    assert any(f["verdict"] == "REDIRECTED" and f["event_type"] == "L3_L4" for f in flows)
    for key in ("time", "verdict", "traffic_direction", "source", "destination", "l4", "Summary"):
        assert all(key in f for f in flows), key

    # Filters and the compact form.
    lines = ok(agent, "observe", "--verdict", "DROPPED", "--from-label", "class=xwing").splitlines()
    assert lines and all("xwing" in ln and "DENIED" in ln for ln in lines)
    lines = ok(agent, "observe", "--protocol", "http", "--last", "50").splitlines()
    assert any(
        "http-request DROPPED (HTTP/1.1 403" in ln and "PUT /v1/exhaust-port" in ln for ln in lines
    )
    assert not any("policy-verdict" in ln for ln in lines)
    assert ok(agent, "observe", "--to-label", "class=xwing") == ""

    # The admin port serves the live service map from the same stream.
    import urllib.request

    admin = json.loads(ok(agent, "status", "-o", "json"))["parts"]["admin"]["detail"]
    graph = json.loads(urllib.request.urlopen(f"http://{admin}/map.json", timeout=5).read())
    edges = {e["id"]: e for e in graph["edges"]}
    assert edges["default/tiefighter->default/deathstar:http/80"]["dropped"] == 1
    assert {n["name"] for n in graph["nodes"]} >= {"deathstar", "tiefighter", "xwing"}

    metrics = ok(agent, "metrics")
    assert _metric(metrics, 'drop_count_total{reason="POLICY_DENIED",direction="INGRESS"}') >= 1
    assert _metric(metrics, "forward_count_total") > 0
    assert _metric(metrics, 'policy_l7_total{rule="denied",proto="http"}') == 1
    assert _metric(metrics, 'policy_l7_total{rule="forwarded",proto="http"}') == 1
    assert _metric(metrics, 'proxy_redirects{protocol="http"}') == 2
    assert _metric(metrics, "endpoint_count") == 3
    assert _metric(metrics, "policy_change_total") == 2


def _epoch(stamp: str) -> float:
    """A flow's time (RFC 3339 with nanoseconds, UTC) as seconds since the epoch."""
    secs = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    return secs + float("0." + stamp[20:].rstrip("Z") or "0")


def requests_made(client: subprocess.Popen) -> int:
    """How many requests the KEEPALIVE client has made so far (it answers SIGUSR1)."""
    client.send_signal(signal.SIGUSR1)
    while True:
        line = client.stdout.readline()
        assert line and not line.startswith("fail"), f"the keep-alive client failed: {line}"
        if line.startswith("count:"):
            return int(line.split(":")[1])


def wait_for(cond, what: str, timeout: float = 30.0, every: float = 0.2):
    """Poll `cond()` until it returns something true; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} (not within {timeout}s)")
        time.sleep(every)


def test_observe_follow_streams_new_flows(galaxy):
    agent = galaxy.agent
    ok(agent, "policy", "import", L7)
    follow = subprocess.Popen(
        [sys.executable, "-m", "l7proxy", "observe", "--follow", "--protocol", "http",
         "-o", "json"],
        stdout=subprocess.PIPE,
        text=True,
        env=agent.env,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in follow.stdout], daemon=True).start()
    try:
        # The CLI may subscribe after a given request (its start-up is slow on a loaded box), so
        # send the denied request until the stream shows one; every wait here is bounded.
        deadline = time.monotonic() + 60
        flow = None
        while flow is None:
            assert time.monotonic() < deadline, "observe --follow printed no flow within 60 s"
            assert follow.poll() is None, "observe --follow exited"
            assert galaxy.curl("tiefighter", "PUT", "/v1/exhaust-port") == "403"
            with contextlib.suppress(queue.Empty):
                flow = json.loads(lines.get(timeout=2))
        assert flow["verdict"] == "DROPPED" and flow["l7"]["http"]["url"].endswith(
            "/v1/exhaust-port"
        )
    finally:
        follow.terminate()
        follow.wait(5)


def test_restart_under_load_keeps_connections_and_enforcement(galaxy):
    agent = galaxy.agent
    ok(agent, "policy", "import", L3L4)
    tie = galaxy.eps["tiefighter"]
    # One keep-alive HTTP connection from the tiefighter, busy across the restart.
    client = subprocess.Popen(
        ["ip", "netns", "exec", agent.prefix + "tiefighter", sys.executable, "-c", KEEPALIVE,
         galaxy.star],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert client.stdout.readline().startswith("ok")
        agent.stop()
        # The pinned programs keep enforcing while no agent runs.
        assert galaxy.curl("xwing", "POST", "/v1/request-landing") == "timeout"
        assert galaxy.curl("tiefighter", "POST", "/v1/request-landing") == "200"
        agent.start()
        status = json.loads(ok(agent, "status", "-o", "json"))
        assert status["parts"]["datapath"]["detail"].startswith("re-opened pins")
        assert galaxy.curl("xwing", "POST", "/v1/request-landing") == "timeout"
        at_restart = requests_made(client)
        wait_for(lambda: requests_made(client) >= at_restart + 10, "requests after the restart")
    finally:
        client.terminate()
        out, _ = client.communicate(timeout=10)
    counts = out.split()
    # the keep-alive connection made requests before, during and after the restart, never failing
    assert counts and counts[-1].startswith("done") and "fail" not in out, out
    assert int(counts[-1].split(":")[1]) >= at_restart + 10
    after = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
    assert after["tiefighter"]["identity"] == tie["identity"]


KEEPALIVE = """
import http.client, signal, sys, time
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=3)
n = 0
def bye(*_):
    print(f"done:{n}", flush=True); sys.exit(0)
signal.signal(signal.SIGTERM, bye)
signal.signal(signal.SIGUSR1, lambda *_: print(f"count:{n}", flush=True))
while True:
    try:
        conn.request("POST", "/v1/request-landing", body=b"")
        r = conn.getresponse(); r.read()
        if r.status != 200:
            print("fail", r.status, flush=True)
    except Exception as exc:
        print("fail", exc, flush=True); sys.exit(1)
    n += 1
    if n == 1:
        print("ok", flush=True)
    time.sleep(0.02)
"""


SLOW = """
import socket, sys, time, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 80)); s.listen(); print("listening", flush=True)
def serve(c):
    c.recv(65536); time.sleep(1.0)
    c.sendall(b"HTTP/1.1 200 OK\\r\\ncontent-length: 5\\r\\nconnection: close\\r\\n\\r\\nslow\\n"); c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

ALLOW_ALL_L7 = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: slow}
spec:
  endpointSelector: {matchLabels: {app: slow}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules: {http: [{method: GET}]}
"""


def test_agent_stop_drains_requests_in_flight_through_the_node_proxy(tmp_path):
    policy = tmp_path / "slow.yaml"
    policy.write_text(ALLOW_ALL_L7)
    agent = AgentProcess(pool=free_pool(), bpf=True)
    agent.start()
    server = None
    try:
        ok(agent, "endpoint", "create", "slow", "--labels", "app=slow")
        ok(agent, "endpoint", "create", "client", "--labels", "app=client")
        ip = {e["name"]: e["ip"] for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        server = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "slow", sys.executable, "-c", SLOW, ip["slow"]],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "listening"
        ok(agent, "policy", "import", str(policy))
        curl = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "client", "curl", "-s", "-m", "5",
             f"http://{ip['slow']}/x"],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        time.sleep(0.4)  # the request is in the proxy, waiting for the slow answer
        agent.stop()
        out, _ = curl.communicate(timeout=10)
        assert out == "slow\n", "the request in flight finished during the stop"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        agent.close()


def test_proxy_worker_process_keeps_l7_connections_across_agent_restarts():
    agent = AgentProcess(
        pool=free_pool(),
        bpf=True,
        extra_args=("--proxy-worker", "process"),
    )
    agent.start()
    g = client = None
    try:
        g = Galaxy(agent)
        ok(agent, "policy", "import", L7)
        # The worker picks the new state up from its stream: the PUT is denied once it has.
        wait_for(lambda: g.curl("tiefighter", "PUT", "/v1/exhaust-port") == "403", "L7 in force")
        before = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]
        assert before["state"] == "ok" and "(started)" in before["detail"]
        # One keep-alive HTTP connection through the worker, busy across the restart: every
        # request is L7-checked (POST /v1/request-landing is allowed).
        client = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "tiefighter", sys.executable, "-c",
             KEEPALIVE, g.star],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert client.stdout.readline().startswith("ok")
        agent.stop()
        gone = time.time()  # the old agent has exited
        # Stay away for a second: the worker keeps proxying and buffers its flows meanwhile.
        # (An idle machine restarts the agent in ~0.3 s, which would leave no such flows.)
        time.sleep(1.0)
        agent.start()
        answers = time.time()  # the new one answers (its API came up just before)
        at_restart = requests_made(client)
        after = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]
        assert (
            "(re-attached)" in after["detail"]
            and after["detail"].split()[2] == before["detail"].split()[2]
        )
        # The worker kept the policy across the restart; this deny is made after it.
        assert g.curl("tiefighter", "PUT", "/v1/exhaust-port") == "403"
        # The worker follows the new agent: a policy change reaches it.
        ok(agent, "policy", "import", L3L4)
        wait_for(lambda: g.curl("tiefighter", "PUT", "/v1/exhaust-port") == "503", "L3/L4 only now")
        # The worker's flows and metrics reach the new agent (over its channel, acknowledged;
        # what the old agent did not acknowledge is sent again).
        denied = {"verdict": "DROPPED", "protocol": "http"}

        def worker_reported() -> bool:
            flows = agent.client.call("observe", filter=denied, last=100)
            metrics = agent.client.call("metrics")
            return any(f["l7"]["http"]["method"] == "PUT" for f in flows if f.get("l7")) and (
                _metric(metrics, 'policy_l7_total{rule="denied",proto="http"}') >= 1
            )

        wait_for(worker_reported, "no L7 deny flow/metric from the worker in the new agent")
        lines = ok(agent, "observe", "--protocol", "http", "--verdict", "DROPPED").splitlines()
        assert any("PUT /v1/exhaust-port" in ln for ln in lines), lines

        # Flows the worker made while no agent listened were kept and reach the new agent.
        def between_agents() -> list[dict]:
            flows = agent.client.call("observe", filter={"protocol": "http"}, last=10_000)
            return [f for f in flows if gone < _epoch(f["time"]) < answers - 0.3]

        wait_for(between_agents, "flows made while no agent listened reach the new agent")
        # the keep-alive connection through the worker goes on after the restart
        wait_for(lambda: requests_made(client) >= at_restart + 10, "requests after the restart")
    finally:
        if client is not None:
            client.terminate()
            out, _ = client.communicate(timeout=10)
        if g is not None:
            g.close()
        agent.close()
    counts = out.split()
    assert counts and counts[-1].startswith("done") and "fail" not in out, out
    assert int(counts[-1].split(":")[1]) >= at_restart + 10


TWO_PORTS = """
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port)); s.listen()
    while True:
        c, _ = s.accept(); c.sendall(b"hi"); c.close()
for port in (8080, 8081):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
print("listening", flush=True)
threading.Event().wait()
"""

CONNECT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1.5) as c:
        print(c.recv(2).decode())
except TimeoutError:
    print("timeout")
"""

INGRESS_NAMED = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: named-web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{ports: [{port: web, protocol: TCP}]}]
"""


def test_named_port_from_the_endpoint_resolves_in_the_kernel_and_survives_a_restart(tmp_path):
    policy = tmp_path / "named.yaml"
    policy.write_text(INGRESS_NAMED)
    agent = AgentProcess(pool=free_pool(), bpf=True)
    agent.start()
    server = None
    try:
        ok(agent, "endpoint", "create", "web", "--labels", "app=web", "--port", "web=8080")
        ok(agent, "endpoint", "create", "client", "--labels", "app=client")
        bad = agent.cli("endpoint", "create", "x", "--labels", "a=b", "--port", "web=99999")
        assert bad.returncode == 2 and "bad port number '99999' for 'web'" in bad.stderr
        eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        assert eps["web"]["ports"] == [{"name": "web", "port": 8080, "protocol": "TCP"}]
        assert eps["client"]["ports"] == []
        assert "web=8080/TCP" in ok(agent, "endpoint", "list")
        ip = eps["web"]["ip"]
        server = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "web", sys.executable, "-c", TWO_PORTS, ip],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "listening"

        def connect(port: int) -> str:
            r = subprocess.run(
                ["ip", "netns", "exec", agent.prefix + "client", sys.executable, "-c", CONNECT,
                 ip, str(port)],
                capture_output=True,
                text=True,
                timeout=20,
            )  # fmt: skip
            return r.stdout.strip() or r.stderr.strip()

        assert connect(8081) == "hi"  # no policy yet: both ports answer
        ok(agent, "policy", "import", str(policy))
        assert connect(8080) == "hi"
        assert connect(8081) == "timeout"

        def dropped_8081() -> bool:
            flows = agent.client.call("observe", filter={"verdict": "DROPPED"}, last=500)
            return any(
                f.get("l4", {}).get("TCP", {}).get("destination_port") == 8081
                and f.get("drop_reason_desc") == "POLICY_DENIED"
                for f in flows
            )

        wait_for(dropped_8081, "the kernel's drop of port 8081 in the flow log")

        def trace(port: int) -> dict:
            out = ok(agent, "policy", "trace", "--src-endpoint", "client", "--dst-endpoint",
                     "web", "--dport", str(port), "-o", "json")  # fmt: skip
            return json.loads(out)

        # `policy trace` resolves the name with the endpoints' ports too, as the agent did.
        assert trace(8080)["verdict"] == "ALLOWED"
        assert "matches port web/TCP (= 8080)" in json.dumps(trace(8080)["ingress"]["rules"])
        assert trace(8081)["verdict"] == "DENIED"
        # The restarted agent reads the named port back from its store and recompiles with it:
        # had it lost the table, the sync would remove the 8080 entry and the connect would fail.
        agent.stop()
        agent.start()
        after = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        assert after["web"]["ports"] == eps["web"]["ports"]
        assert connect(8080) == "hi"
        assert connect(8081) == "timeout"
    finally:
        if server is not None:
            server.kill()
            server.wait()
        agent.close()
    assert not agent.pin_dir.exists()


TWO_REQUESTS = """
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=3)
for _ in range(2):
    conn.request("POST", "/v1/request-landing")
    r = conn.getresponse(); r.read()
    print(r.status, flush=True)
    sys.stdin.readline()
"""


def test_a_tightened_rule_applies_to_the_next_request_of_an_open_connection(galaxy, tmp_path):
    """Rule-set ids are content hashes: the node proxy must judge an open keep-alive connection
    by the policy now in force, not by the rule set it captured when it connected."""
    agent = galaxy.agent
    ok(agent, "policy", "import", L7)
    client = subprocess.Popen(
        ["ip", "netns", "exec", agent.prefix + "tiefighter", sys.executable, "-c", TWO_REQUESTS,
         galaxy.star],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert client.stdout.readline().strip() == "200"
        tight = tmp_path / "tight.yaml"
        tight.write_text(Path(L7).read_text().replace("/v1/request-landing", "/v1/other"))
        ok(agent, "policy", "import", str(tight))
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline().strip() == "403"  # same connection, the new rule
        client.stdin.write("\n")
        client.stdin.flush()
    finally:
        client.kill()
        client.wait()
