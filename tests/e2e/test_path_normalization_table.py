"""Issue 19 end to end: every row of tests/path_table.py sent through a real `l7proxy gateway`
(policy: only `GET /public/.*`) to real backends that resolve paths themselves, nginx and
Python's `http.server`, over HTTP/1 (raw sockets, so the bytes are exactly the row's) and HTTP/2
(a raw h2 client, so `:path` is exactly the row's; nginx as the h2c backend: http.server has no
HTTP/2). Each row asserts:

- 400 rows: the proxy answers 400 and the backend gets nothing;
- rows whose normalized form the policy denies: 403 with the deny message, backend gets nothing;
- allowed rows: the backend got exactly the normalized target (nginx's `$request_uri`,
  http.server's request line), so what the policy judged is what the backend read;
- always: the backend's secret (nginx `location /admin`, http.server's `admin` file and the
  root index) never comes back.

"Got nothing" is checked with a sentinel request sent after the row: the backend's log must have
the sentinel's line and no other. The default mode (unescape) runs against both backends over
HTTP/1 and against nginx over HTTP/2; reject and keep run against nginx. Keep is Envoy's
KEEP_UNCHANGED and unsafe: its test asserts that the gateway warns at start and that nginx does
serve the secret for exactly the escaped-slash rows, which also shows this rig catches a bypass.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.e2e.peers import Gateway, NginxServer, free_port, policy_yaml, wait_port
from tests.path_client import h1_get, h2_get
from tests.path_table import BAD, ROWS, verdict

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

DENY_BODY = b"Access denied\r\n"
SECRET = b"SECRET"

NGINX_CONF = """daemon off;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  log_format paths escape=none '$request_uri';
  access_log {dir}/paths.log paths;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port}{listen_flags};
    root {dir}/html;
    location /admin {{ return 200 "SECRET admin\\n"; }}
  }}
}}
"""
FILES = {
    "index.html": b"SECRET root index\n",
    "admin": b"SECRET admin file\n",
    "public/index.html": b"public index\n",
    "public/x": b"public x\n",
}


class NginxPaths(NginxServer):
    """nginx logging `$request_uri` (the target exactly as it arrived) of every request."""

    def __init__(self, http2: bool) -> None:
        conf = NGINX_CONF.replace("{listen_flags}", " http2" if http2 else "")
        super().__init__(need_binary("nginx"), conf, FILES, "l7proxy-paths-")
        self.log_path = Path(self.dir, "paths.log")

    def targets(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text("latin-1").splitlines()


class PythonHttpServer:
    """`python -m http.server` serving FILES, in a subprocess; its request log (stderr) gives the
    request line of every request."""

    def __init__(self, tmp: Path) -> None:
        root = tmp / "html"
        for rel, data in FILES.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        self.port = free_port()
        self.log_path = tmp / "http.server.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
             "--directory", str(root)],
            stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True,
        )  # fmt: skip
        wait_port(self.port)

    def targets(self) -> list[str]:
        out = []
        for line in self.log_path.read_text("latin-1").splitlines():
            _, quote, rest = line.partition('"')
            if quote and rest.startswith("GET "):
                out.append(rest[4:].rpartition(" HTTP/")[0])
        return out

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self._log.close()


# ---- gateways, one per (mode, backend), started on first use --------------------------------

BACKENDS = {"h1-nginx": False, "h1-python": False, "h2-nginx": True}  # name -> HTTP/2


class Rig:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.backends: dict[str, object] = {}
        self.gateways: dict[tuple[str, str], Gateway] = {}
        self.sentinels = itertools.count()

    def backend(self, name: str):
        if name not in self.backends:
            if name == "h1-python":
                self.backends[name] = PythonHttpServer(self.tmp / "pyserver")
            else:
                self.backends[name] = NginxPaths(http2=BACKENDS[name])
        return self.backends[name]

    def gateway(self, mode: str, name: str) -> Gateway:
        key = (mode, name)
        if key not in self.gateways:
            port = free_port()
            policy = self.tmp / f"policy-{mode}-{name}.yaml"
            policy.write_text(policy_yaml(port))
            args = [
                "--listen", f"127.0.0.1:{port}",
                "--upstream", f"127.0.0.1:{self.backend(name).port}",
                "--policy", str(policy), "--labels", "app=web",
                "--protocol", "http2" if BACKENDS[name] else "http",
                "--path-escaped-slashes", mode,
            ]  # fmt: skip
            self.gateways[key] = Gateway(args)
        return self.gateways[key]

    def stop(self) -> None:
        for gw in self.gateways.values():
            gw.stop()
        for backend in self.backends.values():
            backend.stop()


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    r = Rig(tmp_path_factory.mktemp("paths"))
    yield r
    r.stop()


def wait_new(backend, seen: int, count: int, timeout: float = 5.0) -> list[str]:
    """The backend's log lines after the first `seen`, once there are `count` of them."""
    end = time.monotonic() + timeout
    while len(lines := backend.targets()[seen:]) < count and time.monotonic() < end:
        time.sleep(0.01)
    return lines


def send_row(rig: Rig, mode: str, name: str, target: str) -> tuple[int, bytes, list[str]]:
    """(status, body, what reached the backend for this request). A sentinel request after it
    marks the end, so "nothing" means nothing, not "not yet"."""
    backend, gw = rig.backend(name), rig.gateway(mode, name)
    get = h2_get if BACKENDS[name] else h1_get
    seen = len(backend.targets())
    status, body = get("127.0.0.1", gw.port, target)
    sentinel = f"/public/x?sentinel={next(rig.sentinels)}"
    assert get("127.0.0.1", gw.port, sentinel)[0] == 200
    lines = wait_new(backend, seen, 1)
    end = time.monotonic() + 5
    while sentinel not in lines and time.monotonic() < end:
        time.sleep(0.01)
        lines = backend.targets()[seen:]
    assert lines[-1:] == [sentinel], lines
    return status, body, lines[:-1]


def check_row(row, mode: str, name: str, status: int, body: bytes, reached: list[str]) -> None:
    expected = row.expected(mode, http2=BACKENDS[name])
    want = verdict(expected)
    if want == BAD:
        assert (status, reached) == (400, []), (status, body)
    elif want == 403:
        assert (status, body, reached) == (403, DENY_BODY, []), (status, body, reached)
    else:
        assert reached == [expected], (status, body)
        assert status in (200, 301, 404), (status, body)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_default_mode_row(rig, row, name):
    status, body, reached = send_row(rig, "unescape", name, row.target)
    assert SECRET not in body, (status, body)
    check_row(row, "unescape", name, status, body, reached)


@pytest.mark.parametrize("name", ["h1-nginx", "h2-nginx"])
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_reject_mode_row(rig, row, name):
    status, body, reached = send_row(rig, "reject", name, row.target)
    assert SECRET not in body, (status, body)
    check_row(row, "reject", name, status, body, reached)


# Rows where keep forwards a %2F-dotted path that nginx decodes and resolves to /admin.
KEEP_HOLES = {
    "escaped-slash", "escaped-lowercase", "escaped-mixed-case", "escaped-slash-chain",
    "absolute-form",
}  # fmt: skip


@pytest.mark.parametrize("name", ["h1-nginx", "h2-nginx"])
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_keep_mode_row_is_the_known_hole(rig, row, name):
    status, body, reached = send_row(rig, "keep", name, row.target)
    check_row(row, "keep", name, status, body, reached)
    hole = row.name in KEEP_HOLES and row.expected("keep", http2=BACKENDS[name]) != BAD
    assert (SECRET in body) == hole, (status, body)


def test_keep_mode_warns_at_start(rig):
    gw = rig.gateway("keep", "h1-nginx")
    assert "warning: path_escaped_slashes=keep" in gw.wait_log("warning: path_escaped")
    assert "warning: path_escaped_slashes" not in rig.gateway("unescape", "h1-nginx").log()


def test_the_issue_reproduction_with_curl(rig):
    """The issue's own command: `curl --path-as-is http://GATEWAY/public/..%2Fadmin`."""
    gw = rig.gateway("unescape", "h1-nginx")
    for path in ("/public/..%2Fadmin", "/public/%2e%2e%2fadmin"):
        r = subprocess.run(
            [need_binary("curl"), "-sS", "--path-as-is", "-o", "-", "-w", "\n%{http_code}",
             f"http://127.0.0.1:{gw.port}{path}"],
            capture_output=True, timeout=20,
        )  # fmt: skip
        assert r.stdout == DENY_BODY + b"\n403", r.stdout
