"""`l7proxy agent --mode sidecar`: per-endpoint sidecar listeners fed by cgroup connect()
redirection, through the CLI (`endpoint exec` puts a command in the endpoint's cgroup)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, client_egress_l7, free_pool, ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(120)]

EGRESS_L7 = client_egress_l7(80)


def test_sidecar_mode_enforces_egress_l7_for_an_unmodified_curl(tmp_path):
    policy = tmp_path / "egress.yaml"
    policy.write_text(EGRESS_L7)
    agent = AgentProcess(pool=free_pool(), bpf=True, mode="sidecar")
    agent.start()
    server = None
    try:
        ok(agent, "endpoint", "create", "web", "--labels", "app=web")
        ok(agent, "endpoint", "create", "client", "--labels", "app=client")
        eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        assert Path(eps["client"]["cgroup"]).is_dir()
        status = json.loads(ok(agent, "status", "-o", "json"))
        assert (
            status["mode"] == "sidecar" and "sidecars client:" in status["parts"]["proxy"]["detail"]
        )
        web = eps["web"]["ip"]
        server = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "web", sys.executable, "-m", "demo.deathstar",
             web],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert server.stdout.readline().strip() == "listening"
        ok(agent, "policy", "import", str(policy))

        def code(path: str, *, in_cgroup: bool = True) -> str:
            curl = [
                "curl",
                "-s",
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://{web}{path}",
            ]
            if in_cgroup:
                return ok(agent, "endpoint", "exec", "client", "--", *curl)
            r = subprocess.run(
                ["ip", "netns", "exec", agent.prefix + "client", *curl],
                capture_output=True,
                text=True,
            )
            return r.stdout

        assert code("/public/plans") == "200"
        assert code("/private/plans") == "403"
        detail = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]["detail"]
        assert "(2 conns)" in detail and "0 node-proxy connections" in detail, detail
        # Outside the cgroup, tc redirects the same flow to the node proxy: same verdicts.
        assert code("/private/plans", in_cgroup=False) == "403"
        assert code("/public/plans", in_cgroup=False) == "200"
        time.sleep(0.3)
        flows = [
            json.loads(x)
            for x in ok(
                agent, "observe", "--protocol", "http", "-o", "json", "--last", "20"
            ).splitlines()
        ]
        denied = [f for f in flows if f["verdict"] == "DROPPED"]
        assert len(denied) == 2 and all(f["traffic_direction"] == "EGRESS" for f in denied)
        assert all(f["source"]["identity"] == eps["client"]["identity"] for f in denied)
        detail = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]["detail"]
        assert "(2 conns)" in detail and "2 node-proxy connections" in detail, detail
    finally:
        if server is not None:
            server.kill()
            server.wait()
        agent.close()
    assert not Path(eps["client"]["cgroup"]).exists()


WEB = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class Named(BaseHTTPRequestHandler):
    def do_GET(self):
        body = sys.argv[2].encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = HTTPServer((sys.argv[1], 80), Named)
print("listening", flush=True)
server.serve_forever()
"""

# Bound to a chosen local port before connect(), as two endpoints' clients can be by chance.
SAME_PORT_CLIENT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[3])))
s.settimeout(10)
s.connect((sys.argv[1], 80))
print("connected", flush=True)
s.sendall(f"GET {sys.argv[2]} HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n".encode())
data = b""
while chunk := s.recv(4096):
    data += chunk
head, _, body = data.decode().partition("\\r\\n\\r\\n")
print(head.split(" ")[1], body, flush=True)
"""

TWO_CLIENTS = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client-a}
    spec:
      endpointSelector: {matchLabels: {app: client-a}}
      egress:
        - toEndpoints: [{matchLabels: {app: web-a}}]
          toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules: {http: [{method: GET, path: /a/.*}]}
    ---
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client-b}
    spec:
      endpointSelector: {matchLabels: {app: client-b}}
      egress:
        - toEndpoints: [{matchLabels: {app: web-b}}]
          toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules: {http: [{method: GET, path: /public/.*}]}
    """
)


def test_two_endpoints_same_client_port_keep_their_own_destination(tmp_path):
    """127.0.0.1 is in every endpoint's namespace: clients of two endpoints connect from the same
    local port while the agent is stopped (so both entries are in the map at once), and each
    connection still reaches its own destination, judged with its own identity and policy."""
    policy = tmp_path / "two.yaml"
    policy.write_text(TWO_CLIENTS)
    agent = AgentProcess(pool=free_pool(), bpf=True, mode="sidecar")
    agent.start()
    servers: list[subprocess.Popen] = []
    try:
        for name in ("web-a", "web-b", "client-a", "client-b"):
            ok(agent, "endpoint", "create", name, "--labels", f"app={name}")
        eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        for name in ("web-a", "web-b"):
            servers.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", agent.prefix + name, sys.executable, "-c", WEB,
                     eps[name]["ip"], name],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )  # fmt: skip
            assert servers[-1].stdout.readline().strip() == "listening"
        ok(agent, "policy", "import", str(policy))
        local = random.randint(40000, 49999)

        def client(name: str, web: str, path: str) -> subprocess.Popen:
            cgroup = Path(eps[name]["cgroup"])

            def enter():
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

            return subprocess.Popen(
                ["ip", "netns", "exec", agent.prefix + name, sys.executable, "-c",
                 SAME_PORT_CLIENT, eps[web]["ip"], path, str(local)],
                preexec_fn=enter,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip

        agent.proc.send_signal(signal.SIGSTOP)  # the sidecars accept nothing until SIGCONT
        try:
            a = client("client-a", "web-a", "/a/1")
            assert a.stdout.readline().strip() == "connected", a.stderr.read()
            b = client("client-b", "web-b", "/b/1")
            assert b.stdout.readline().strip() == "connected", b.stderr.read()
        finally:
            agent.proc.send_signal(signal.SIGCONT)
        out_a, err_a = a.communicate(timeout=15)
        out_b, err_b = b.communicate(timeout=15)
        assert out_a.strip() == "200 web-a", (err_a, agent.log())
        assert out_b.strip().startswith("403 "), (err_b, agent.log())
        time.sleep(0.3)
        flows = [
            json.loads(x)
            for x in ok(
                agent, "observe", "--protocol", "http", "-o", "json", "--last", "20"
            ).splitlines()
        ]
        seen = {
            (f["verdict"], f["source"]["identity"], f["destination"]["identity"]) for f in flows
        }
        ident = {name: e["identity"] for name, e in eps.items()}
        assert ("FORWARDED", ident["client-a"], ident["web-a"]) in seen, flows
        assert ("DROPPED", ident["client-b"], ident["web-b"]) in seen, flows
    finally:
        for server in servers:
            server.kill()
            server.wait()
        agent.close()
