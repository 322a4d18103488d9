"""Issue 19 in the kernel-redirect modes: the node proxy (`l7proxy agent --mode node`, tc
redirects the client's connection) and the sidecar (`--mode sidecar`, cgroup connect()
redirection) run the same HTTP/1 and HTTP/2 sessions as the gateway, so every row of
tests/path_table.py must get the same verdict there. The backends are real nginx (HTTP/1 on :80,
h2c on :81) and `python -m http.server` (:8080) inside the web endpoint's namespace; the client
is tests/path_client.py run in the client endpoint (inside its cgroup for the sidecar, outside
it for the node proxy of the same agent).

Per batch of rows: each answer is the row's verdict (400, 403 with the deny message, or the
backend's own answer), and the backend's log, read after a sentinel request, holds exactly the
normalized targets of the allowed rows, in order: a denied row never reached it. The secret
never comes back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool, ok
from tests.conftest import need_binary
from tests.path_table import BAD, ROWS, verdict

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
CLIENT = str(REPO / "tests" / "path_client.py")
DENY_BODY = "Access denied\r\n"
SECRET = "SECRET"
FILES = {
    "index.html": b"SECRET root index\n",
    "admin": b"SECRET admin file\n",
    "public/index.html": b"public index\n",
    "public/x": b"public x\n",
}
NGINX_CONF = """daemon off;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  log_format paths escape=none '$request_uri';
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen {ip}:80;
    access_log {dir}/h1.log paths;
    root {dir}/html;
    location /admin {{ return 200 "SECRET admin\\n"; }}
  }}
  server {{
    listen {ip}:81 http2;
    access_log {dir}/h2.log paths;
    root {dir}/html;
    location /admin {{ return 200 "SECRET admin\\n"; }}
  }}
}}
"""
PORTS = '[{port: "80", protocol: TCP}, {port: "81", protocol: TCP}, {port: "8080", protocol: TCP}]'
TO_PORTS = f"""
      toPorts:
        - ports: {PORTS}
          rules:
            http:
              - method: GET
                path: /public/.*
"""
INGRESS = (
    """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-ingress}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints:
        - matchLabels: {app: client}"""
    + TO_PORTS
)
EGRESS = (
    """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client-egress}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints:
        - matchLabels: {app: web}"""
    + TO_PORTS
)


class Backends:
    """nginx and http.server in the web endpoint's namespace, with their request logs."""

    def __init__(self, netns: str, ip: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="l7proxy-paths-agent-"))
        os.chmod(self.dir, 0o755)  # nginx workers run as an unprivileged user
        for rel, data in FILES.items():
            (self.dir / "html" / rel).parent.mkdir(parents=True, exist_ok=True)
            (self.dir / "html" / rel).write_bytes(data)
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, ip=ip))
        self.py_log = open(self.dir / "http.server.log", "w")  # noqa: SIM115
        self.procs = [
            subprocess.Popen(
                ["ip", "netns", "exec", netns, need_binary("nginx"), "-c", str(conf),
                 "-p", str(self.dir)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            ),
            subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-u", "-m", "http.server", "8080",
                 "--bind", ip, "--directory", str(self.dir / "html")],
                stdout=subprocess.DEVNULL, stderr=self.py_log, start_new_session=True,
            ),
        ]  # fmt: skip
        self.netns, self.ip = netns, ip
        for port in (80, 81, 8080):
            self._wait_listening(port)

    def _wait_listening(self, port: int) -> None:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            r = subprocess.run(
                ["ip", "netns", "exec", self.netns, "ss", "-Hltn", f"sport = :{port}"],
                capture_output=True, text=True,
            )  # fmt: skip
            if r.stdout.strip():
                return
            time.sleep(0.1)
        raise TimeoutError(f"nothing listens on {self.ip}:{port} in {self.netns}")

    def targets(self, port: int) -> list[str]:
        if port == 8080:
            out = []
            for line in (self.dir / "http.server.log").read_text("latin-1").splitlines():
                _, quote, rest = line.partition('"')
                if quote and rest.startswith("GET "):
                    out.append(rest[4:].rpartition(" HTTP/")[0])
            return out
        log = self.dir / ("h1.log" if port == 80 else "h2.log")
        return log.read_text("latin-1").splitlines() if log.exists() else []

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(10)
        self.py_log.close()


def send(agent: AgentProcess, ip: str, port: int, targets: list[str], in_cgroup: bool) -> list:
    """Run tests/path_client.py in the client endpoint: [[status, body], ...]."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(targets, f)
    proto = "h2" if port == 81 else "h1"
    cmd = [sys.executable, CLIENT, ip, str(port), proto, f.name]
    if in_cgroup:
        out = ok(agent, "endpoint", "exec", "client", "--", *cmd)
    else:
        r = subprocess.run(
            ["ip", "netns", "exec", agent.prefix + "client", *cmd],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        out = r.stdout
    os.unlink(f.name)
    return json.loads(out)


def check_batch(agent, backends: Backends, port: int, in_cgroup: bool, tag: str) -> None:
    http2 = port == 81
    seen = len(backends.targets(port))
    answers = send(agent, backends.ip, port, [r.target for r in ROWS], in_cgroup)
    sentinel = f"/public/x?sentinel={tag}-{port}"
    assert send(agent, backends.ip, port, [sentinel], in_cgroup)[0][0] == 200
    end = time.monotonic() + 10
    while sentinel not in (got := backends.targets(port)[seen:]) and time.monotonic() < end:
        time.sleep(0.05)
    forwarded = []
    for row, (status, body) in zip(ROWS, answers, strict=True):
        expected = row.expected("unescape", http2=http2)
        want = verdict(expected)
        assert SECRET not in body, (row.name, status, body)
        if want == BAD:
            assert status == 400, (row.name, status, body)
        elif want == 403:
            assert (status, body) == (403, DENY_BODY), (row.name, status, body)
        else:
            assert status in (200, 301, 404), (row.name, status, body)
            forwarded.append(expected)
    assert got == [*forwarded, sentinel]


def proxy_connections(agent: AgentProcess) -> dict[str, int]:
    """Connections so far through the node proxy and the client's sidecar (status detail)."""
    detail = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]["detail"]
    node = re.search(r"(\d+) (?:node-proxy )?connections", detail)
    sidecar = re.search(r"client:\S+ \((\d+) conns\)", detail)
    return {
        "node": int(node.group(1)) if node else -1,
        "sidecar": int(sidecar.group(1)) if sidecar else -1,
    }


def web_and_client(agent: AgentProcess) -> tuple[Backends, str]:
    ok(agent, "endpoint", "create", "web", "--labels", "app=web")
    ok(agent, "endpoint", "create", "client", "--labels", "app=client")
    eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
    ip = eps["web"]["ip"]
    return Backends(agent.prefix + "web", ip), ip


@pytest.mark.parametrize("mode", ["node", "sidecar"])
def test_agent_judges_every_row_like_the_gateway(tmp_path, mode):
    agent = AgentProcess(pool=free_pool(), bpf=True, mode=mode)
    agent.start()
    backends = None
    try:
        backends, _ = web_and_client(agent)
        policy = tmp_path / "policy.yaml"
        policy.write_text(INGRESS if mode == "node" else EGRESS)
        ok(agent, "policy", "import", str(policy))
        # node: tc sends the client's connections to the node proxy; sidecar: inside the
        # client's cgroup connect() goes to its sidecar, outside it tc to the node proxy.
        for in_cgroup in (False, True) if mode == "sidecar" else (False,):
            before = proxy_connections(agent)
            for port in (80, 81, 8080):
                check_batch(agent, backends, port, in_cgroup, f"{mode}-{in_cgroup}")
            after = proxy_connections(agent)
            # every row and sentinel went through the proxy the mode says (one connection each)
            used = "sidecar" if in_cgroup else "node"
            assert after[used] - before[used] >= 3 * (len(ROWS) + 1), (before, after)
            other = "node" if in_cgroup else "sidecar"
            assert after[other] == before[other], (before, after)
    finally:
        if backends is not None:
            backends.stop()
        agent.close()


def test_agent_keep_mode_warns():
    agent = AgentProcess(pool=free_pool(), bpf=False, extra_args=("--path-escaped-slashes", "keep"))
    agent.start()
    try:
        end = time.monotonic() + 10
        while "path_escaped_slashes=keep" not in agent.log() and time.monotonic() < end:
            time.sleep(0.05)
        assert "warning: path_escaped_slashes=keep" in agent.log()
    finally:
        agent.close()
