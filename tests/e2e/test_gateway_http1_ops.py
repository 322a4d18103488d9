"""Operating the gateway: reload under load, invalid reloads, SIGTERM drain, workers, admin,
protocol sniffing and the config file."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.request

import pytest

from tests.e2e.peers import Gateway, free_port, policy_yaml, raw_exchange, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]


def fetch(port: int, path: str) -> bytes:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).read()


def status_of(port: int, path: str) -> int:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


class Load(threading.Thread):
    """Keep-alive GETs on a few connections; records every status and every failure."""

    def __init__(self, port: int, path: str, conns: int = 4) -> None:
        super().__init__(daemon=True)
        self.port, self.path, self.conns = port, path, conns
        self.statuses: list[int] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def _one(self) -> None:
        req = b"GET %s HTTP/1.1\r\nHost: web\r\n\r\n" % self.path.encode()
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            buf = b""
            while not self.stop.is_set():
                s.sendall(req)
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("closed")
                    buf += chunk
                head, _, rest = buf.partition(b"\r\n\r\n")
                length = int(
                    next(
                        ln.split(b":")[1]
                        for ln in head.split(b"\r\n")
                        if ln.lower().startswith(b"content-length")
                    )
                )
                while len(rest) < length:
                    rest += s.recv(65536)
                self.statuses.append(int(head[9:12]))
                buf = rest[length:]
            s.close()
        except Exception as exc:
            self.failures.append(repr(exc))

    def run(self) -> None:
        threads = [threading.Thread(target=self._one) for _ in range(self.conns)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def test_reload_under_load_no_failed_request_and_invalid_policy_kept_out(start_gateway, nginx):
    gw = start_gateway(nginx.port)
    load = Load(gw.port, "/public/index.html")
    load.start()
    assert wait_for(lambda: len(load.statuses) > 10)
    # New revision: GET /public/.* and /private.html; applied by SIGHUP.
    text = gw.policy_path.read_text().replace(
        'path: "/public/.*"',
        'path: "/public/.*"\n        - method: GET\n          path: "/private.html"',
    )
    gw.policy_path.write_text(text)
    gw.signal(signal.SIGHUP)
    assert "policy reloaded" in gw.wait_log("policy reloaded")
    assert status_of(gw.port, "/private.html") == 200
    # An invalid file (by mtime watch, no signal) is rejected; the old policy stays.
    gw.policy_path.write_text(text.replace("toPorts:", "toPortz:"))
    assert "policy reload rejected" in gw.wait_log("policy reload rejected")
    assert status_of(gw.port, "/private.html") == 200
    assert status_of(gw.port, "/nope") == 403
    info = json.loads(fetch(gw.admin_port, "/policy"))
    assert info["revision"] == 2 and info["last_error"]
    load.stop.set()
    load.join(10)
    assert load.failures == [] and len(load.statuses) > 50
    assert set(load.statuses) == {200}
    assert "policy reload rejected" in gw.log()
    metrics = fetch(gw.admin_port, "/metrics").decode()
    assert "l7proxy_policy_reload_errors_total 1" in metrics
    assert "l7proxy_policy_revision 2" in metrics


def test_sigterm_drains_requests_in_flight(start_gateway, pybackend):
    gw = start_gateway(pybackend.port, policy_yaml(0, '- path: "/.*"').replace('"0"', '"{port}"'))
    result = {}

    def slow():
        result["out"] = raw_exchange(gw.port, b"GET /slow/1.5 HTTP/1.1\r\nHost: a\r\n\r\n", 20)

    t = threading.Thread(target=slow)
    t.start()
    idle = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    # SIGTERM once the slow request is at the backend, i.e. in flight.
    assert wait_for(lambda: "/slow/1.5" in [r[1] for r in pybackend.requests])
    gw.signal(signal.SIGTERM)
    assert "draining" in gw.wait_log("draining")

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", gw.port), timeout=1).close()
            return False
        except OSError:
            return True

    assert wait_for(refused)
    try:
        assert idle.recv(10) == b""  # idle keep-alive connections are closed at once
    except ConnectionResetError:
        pass  # (closed before it was even accepted)
    t.join(20)
    assert result["out"].startswith(b"HTTP/1.1 200") and result["out"].endswith(b"slow done\n")
    assert gw.proc.wait(10) == 0
    assert "drained" in gw.log()


def test_workers_share_the_port_and_metrics_add_up(start_gateway, nginx):
    gw = start_gateway(nginx.port, None, "--workers", "2")
    for _ in range(40):
        out = raw_exchange(
            gw.port, b"GET /public/index.html HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        assert out.startswith(b"HTTP/1.1 200")
    assert status_of(gw.port, "/x") == 403
    pids = {json.loads(fetch(gw.admin_port, "/policy"))["pid"] for _ in range(5)}
    assert gw.proc.pid not in pids  # the admin answers from a worker
    metrics = fetch(gw.admin_port, "/metrics").decode()
    # Both workers' counters, summed (the kernel spreads the 41 connections over the two).
    assert 'policy_l7_total{rule="received",proto="http"} 41' in metrics
    assert 'policy_l7_total{rule="denied",proto="http"} 1' in metrics
    assert metrics.count("# TYPE policy_l7_total counter") == 1
    assert gw.stop() == 0


def test_admin_endpoints(start_gateway, nginx):
    gw = start_gateway(nginx.port)
    fetch(gw.port, "/public/index.html")
    status_of(gw.port, "/private.html")
    assert fetch(gw.admin_port, "/healthz") == b"ok\n"
    assert "nodes" in json.loads(fetch(gw.admin_port, "/map.json"))  # the depmap is mounted
    info = json.loads(fetch(gw.admin_port, "/policy"))
    assert info["revision"] == 1 and info["files"] == [str(gw.policy_path)]
    m = fetch(gw.admin_port, "/metrics").decode()
    for line in (
        'policy_l7_total{rule="received",proto="http"} 2',
        'policy_l7_total{rule="forwarded",proto="http"} 1',
        'policy_l7_total{rule="denied",proto="http"} 1',
        'l7proxy_request_duration_seconds_count{proto="http"} 1',
        'l7proxy_active_connections{proto="http"}',
    ):
        assert line in m


def test_auto_protocol_sniffs_http_and_config_file(nginx, tmp_path):
    port = free_port()
    policy = tmp_path / "p.yaml"
    policy.write_text(policy_yaml(port))
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        f"listeners:\n- {{listen: '127.0.0.1:{port}', upstream: '127.0.0.1:{nginx.port}', "
        f'protocol: auto}}\npolicy: [{policy}]\nlabels: app=web\ndeny_message: "no\\n"\n'
    )
    gw = Gateway(["-c", str(cfg)], flow_log=str(tmp_path / "f.log"))
    try:
        assert gw.port == port
        assert fetch(port, "/public/index.html") == b"hello from nginx\n"
        out = raw_exchange(port, b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert out.endswith(b"\r\n\r\nno\n")
        # Bytes that are neither HTTP/1, HTTP/2 nor Kafka are dropped.
        assert raw_exchange(port, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc" + b"\x00" * 60) == b""
    finally:
        assert gw.stop() == 0


def test_config_file_with_two_listeners_and_peers(nginx, pybackend, tmp_path):
    a, b = free_port(), free_port()
    policy = tmp_path / "p.yaml"
    # Port a: GET /public/.* for everyone; port b: anything, but only from app=client peers.
    policy.write_text(
        policy_yaml(a)
        + "---\n"
        + policy_yaml(b, '- path: "/.*"')
        .replace("name: web", "name: web-b")
        .replace(
            "  - toPorts:",
            "  - fromEndpoints:\n    - matchLabels:\n        app: client\n    toPorts:",
        )
    )
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "listeners:\n"
        f"- {{listen: '127.0.0.1:{a}', upstream: '127.0.0.1:{nginx.port}'}}\n"
        f"- {{listen: '127.0.0.1:{b}', upstream: '127.0.0.1:{pybackend.port}'}}\n"
        f"policy: [{policy}]\nlabels: app=web\npeers: ['127.0.0.0/8=app=client']\n"
    )
    gw = Gateway(["-c", str(cfg)], flow_log=str(tmp_path / "f.log"))
    try:
        assert fetch(a, "/public/index.html") == b"hello from nginx\n"
        assert status_of(a, "/other") == 403
        assert (
            b"POST /anything len=2"
            in urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{b}/anything", data=b"hi"), timeout=5
            ).read()
        )
    finally:
        assert gw.stop() == 0


def test_invalid_policy_at_start_is_an_error(tmp_path):
    policy = tmp_path / "bad.yaml"
    policy.write_text("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nspec: 3\n")
    with pytest.raises(RuntimeError, match="invalid policy"):
        Gateway(
            [
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "127.0.0.1:1",
                "--policy",
                str(policy),
                "--labels",
                "app=web",
            ]  # fmt: skip
        )
    assert os.path.exists(policy)


class BigHeadBackend(threading.Thread):
    """Answers `GET /head/N` with a response whose head carries an N-byte header, on keep-alive
    connections; counts the connections it accepted and the requests it served."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.served = 0
        self.accepted = 0

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        buf = b""
        with conn, contextlib.suppress(OSError):  # the gateway drops a connection it gave up on
            while chunk := conn.recv(65536):
                buf += chunk
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    size = int(head.split(b" ")[1].rsplit(b"/", 1)[1])
                    self.served += 1
                    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * size
                                 + b"\r\nContent-Length: 3\r\n\r\nok\n")  # fmt: skip

    def close(self) -> None:
        self.sock.close()


def _gateway_with_limits(tmp_path, backend, limits: str, *extra: str, flow_log=None):
    """The gateway on a free port in front of `backend`, GET /head/.* allowed, with the
    `limits:` section of a config file set to `limits` (YAML lines)."""
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(port, '- method: GET\n          path: "/head/.*"'))
    conf = tmp_path / "gw.yaml"
    conf.write_text(f"limits:\n  {limits}\n")
    gw = Gateway(
        ["--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{backend.port}",
         "--policy", str(policy), "--labels", "app=web", "-c", str(conf), *extra],
        flow_log=flow_log,
    )  # fmt: skip
    return gw, port


def test_upstream_response_head_limit_from_config_file_answers_502(tmp_path):
    backend = BigHeadBackend()
    backend.start()
    gw, port = _gateway_with_limits(tmp_path, backend, "max_response_header_bytes: 4096",
                                    "--admin", "127.0.0.1:0",
                                    flow_log=str(tmp_path / "flows.log"))  # fmt: skip
    try:
        out = raw_exchange(
            port,
            b"GET /head/100 HTTP/1.1\r\nHost: web\r\n\r\n"
            b"GET /head/100000 HTTP/1.1\r\nHost: web\r\n\r\n"
            b"GET /head/200 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
        )
        first, rest = out.split(b"ok\n", 1)
        assert first.startswith(b"HTTP/1.1 200 OK") and b"p" * 100 in first
        bad, last = rest.split(b"upstream response header too large\r\n", 1)
        assert bad.startswith(b"HTTP/1.1 502 Bad Gateway") and b"X-Pad" not in bad
        assert last.startswith(b"HTTP/1.1 200 OK") and b"p" * 200 in last  # the connection goes on
        assert backend.served == 3
        flows = gw.wait_flows(3)
        bad = [f for f in flows if f["l7"]["http"]["code"] == 502]
        assert len(bad) == 1 and bad[0]["verdict"] == "ERROR"
        assert bad[0]["drop_reason_desc"] == "UPSTREAM_RESPONSE_HEADER_TOO_LARGE"
        assert bad[0]["l7"]["http"]["url"] == "/head/100000"
        metrics = fetch(gw.admin_port, "/metrics").decode()
        assert 'l7proxy_upstream_errors_total{proto="http",kind="invalid_response"} 1' in metrics
    finally:
        gw.stop()
        backend.close()


def test_idle_clients_give_their_upstream_connection_back_to_the_pool(tmp_path):
    """`upstream_park_after`: a client with nothing in flight keeps its upstream connection
    only that long, so later clients reuse it and idle clients don't each hold one."""
    backend = BigHeadBackend()
    backend.start()
    gw, port = _gateway_with_limits(tmp_path, backend, "upstream_park_after: 0.2")
    request = b"GET /head/1 HTTP/1.1\r\nHost: web\r\n\r\n"
    clients = []
    try:
        for _ in range(3):  # one after another, each left open and idle
            c = socket.create_connection(("127.0.0.1", port), timeout=5)
            clients.append(c)
            c.sendall(request)
            assert c.recv(65536).endswith(b"ok\n")
            time.sleep(0.8)  # parked by now (0.2 s, swept every 0.25 s)
        assert backend.served == 3 and backend.accepted == 1  # one upstream connection for all
        clients[0].sendall(request)  # an idle client that parked still works
        assert clients[0].recv(65536).endswith(b"ok\n")
        assert backend.accepted == 1
    finally:
        for c in clients:
            c.close()
        gw.stop()
        backend.close()
