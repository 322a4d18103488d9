"""h2c Upgrade through `l7proxy gateway` (issue 5): the HTTP/1 session hands an allowed
`Upgrade: h2c` request to the HTTP/2 session, so the client gets 101 then HTTP/2 and the upstream
(nginx speaking only HTTP/2 with prior knowledge) sees HTTP/2; a denied one is a 403 in HTTP/1."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.e2e.peers import NginxServer, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

NGINX_CONF = """daemon off;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  log_format proto '$server_protocol $request_uri';
  access_log {dir}/access.log proto;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port} http2;
    root {dir}/html;
  }}
}}
"""


class LoggingNginxH2(NginxServer):
    """nginx, HTTP/2 with prior knowledge only, logging `$server_protocol $request_uri`."""

    def __init__(self) -> None:
        files = {"public/index.html": b"hello over h2\n", "private.html": b"secret\n"}
        super().__init__(need_binary("nginx"), NGINX_CONF, files, "l7proxy-nginx-h2c-")

    def requests(self) -> list[str]:
        path = Path(self.dir, "access.log")
        return path.read_text().splitlines() if path.exists() else []


@pytest.fixture(scope="module")
def nginx_h2_logged():
    server = LoggingNginxH2()
    yield server
    server.stop()


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [need_binary("curl"), "-sS", "--max-time", "10", "-w", " %{http_version} %{http_code}",
         *args],
        capture_output=True, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("protocol", ["http", "auto"])
def test_curl_h2c_upgrade_reaches_upstream_as_http2(start_gateway, nginx_h2_logged, protocol):
    gw = start_gateway(nginx_h2_logged.port, None, "--protocol", protocol)
    base = f"http://127.0.0.1:{gw.port}"
    before = len(nginx_h2_logged.requests())
    ok = curl("-v", "--http2", f"{base}/public/index.html?via={protocol}")
    assert ok.stdout == b"hello over h2\n 2 200", ok.stderr
    assert b"HTTP/1.1 101" in ok.stderr  # really the Upgrade path, not prior knowledge
    seen = wait_for(lambda: nginx_h2_logged.requests()[before:])
    assert seen == [f"HTTP/2.0 /public/index.html?via={protocol}"]

    denied = curl("--http2", f"{base}/private.html")
    assert denied.stdout == b"Access denied\r\n 1.1 403", denied.stderr  # no switch
    assert not any("private" in line for line in nginx_h2_logged.requests())

    flows = gw.wait_flows(2)
    http = sorted(
        (f["l7"]["http"]["protocol"], f["verdict"], f["l7"]["http"]["code"]) for f in flows
    )
    assert http == [("HTTP/1.1", "DROPPED", 403), ("HTTP/2", "FORWARDED", 200)]


def test_nghttp_upgrade_then_streams_follow_policy(start_gateway, nginx_h2_logged):
    gw = start_gateway(nginx_h2_logged.port)
    base = f"http://127.0.0.1:{gw.port}"
    out = subprocess.run(
        [need_binary("nghttp"), "-u", "-ns", "-t", "10", f"{base}/public/index.html?n=1",
         f"{base}/private.html?n=2", f"{base}/public/index.html?n=3"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [
        ln.split()
        for ln in out.stdout.splitlines()
        if ln.split()[:1] and ln.split()[0][0].isdigit()
    ]
    status = {row[-1]: row[-3] for row in rows}
    assert status == {
        "/public/index.html?n=1": "200",
        "/private.html?n=2": "403",
        "/public/index.html?n=3": "200",
    }
    seen = wait_for(lambda: [r for r in nginx_h2_logged.requests() if "?n=" in r and "n=3" in r])
    assert seen == ["HTTP/2.0 /public/index.html?n=3"]
    assert not any("private" in line for line in nginx_h2_logged.requests())
