"""The HTTP/1.1 gateway end to end: curl and raw sockets through `l7proxy gateway` to nginx and
a Python backend. Deny bytes are checked exactly."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.e2e.peers import raw_exchange

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DENY = (
    b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n\r\n"
    b"Access denied\r\n"
)


def curl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "10", *args], capture_output=True, timeout=20
    )


def get(port: int, path: str, host="web") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n\r\n" % (path.encode(), host.encode())


def read_response(sock: socket.socket, buf: bytearray) -> bytes:
    """One Content-Length-framed response from `sock` (buffer leftovers in `buf`)."""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed early, got {bytes(buf)!r}"
        buf += chunk
    head, _, _ = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    total = len(head) + 4 + length
    while len(buf) < total:
        chunk = sock.recv(65536)
        assert chunk
        buf += chunk
    out = bytes(buf[:total])
    del buf[:total]
    return out


def test_allow_and_deny_exact_bytes_connection_stays_usable(start_gateway, nginx):
    gw = start_gateway(nginx.port)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        buf = bytearray()
        s.sendall(get(gw.port, "/public/index.html"))
        ok = read_response(s, buf)
        assert ok.startswith(b"HTTP/1.1 200 OK") and ok.endswith(b"hello from nginx\n")
        s.sendall(get(gw.port, "/private.html"))
        assert read_response(s, buf) == DENY
        s.sendall(b"POST /public/index.html HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc")
        assert read_response(s, buf) == DENY  # method mismatch, body skipped
        s.sendall(get(gw.port, "/public/index.html"))
        assert read_response(s, buf).endswith(b"hello from nginx\n")
    r = curl("-i", f"http://127.0.0.1:{gw.port}/public/index.html")
    assert b"200 OK" in r.stdout and r.stdout.endswith(b"hello from nginx\n")
    r = curl("-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{gw.port}/x")
    assert r.stdout == b"403"
    flows = gw.wait_flows(4)
    verdicts = [(f["verdict"], f["l7"]["http"]["url"], f["l7"]["http"]["code"]) for f in flows]
    assert ("FORWARDED", "/public/index.html", 200) in verdicts
    assert ("DROPPED", "/private.html", 403) in verdicts
    denied = next(f for f in flows if f["verdict"] == "DROPPED")
    assert denied["source"]["identity"] == 2  # world: no --peer given
    assert denied["l4"]["TCP"]["destination_port"] == gw.port
    assert "k8s:app=web" in denied["destination"]["labels"] or "app=web" in str(denied)
    assert denied["l7"]["type"] == "REQUEST" and denied["l7"]["latency_ns"] >= 0


def test_pipelined_requests_answered_in_order_with_403_in_place(start_gateway, nginx):
    gw = start_gateway(nginx.port)
    batch = (
        get(gw.port, "/public/index.html")
        + get(gw.port, "/nope")
        + get(gw.port, "/public/index.html")
        + b"GET /public/index.html HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
    )
    out = raw_exchange(gw.port, batch)
    parts = out.split(b"HTTP/1.1 ")[1:]
    assert [p[:3] for p in parts] == [b"200", b"403", b"200", b"200"]
    assert b"HTTP/1.1 " + parts[1] == DENY


def test_deny_message_is_configurable(start_gateway, nginx):
    gw = start_gateway(nginx.port, None, "--deny-message", "nope\n")
    out = raw_exchange(
        gw.port,
        get(gw.port, "/x")
        + get(gw.port, "/y").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"),
    )
    assert out.count(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 5\r\n") == 2
    assert out.endswith(b"\r\n\r\nnope\n")


ALL_METHODS = """- method: ".*"
          path: "/.*\""""


def test_chunked_request_and_response_with_trailers(start_gateway, pybackend):
    gw = start_gateway(pybackend.port, None)  # GET /public/.* only
    gw.stop()
    gw = start_gateway(pybackend.port, _policy_all())
    req = (
        b"POST /echo HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        buf = bytearray()
        s.sendall(req)
        resp = read_response(s, buf)
        assert resp.startswith(b"HTTP/1.1 200") and resp.endswith(b"\nhello world")
        assert b"POST /echo len=11" in resp
        assert pybackend.server.last_trailers == ["X-Trailer: yes"]
        s.sendall(b"GET /chunked HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        rest = bytes(buf)
        while chunk := s.recv(65536):
            rest += chunk
    assert b"Transfer-Encoding: chunked" in rest
    assert rest.endswith(b"4\r\none,\r\n4\r\ntwo,\r\n5\r\nthree\r\n0\r\nX-Checksum: 42\r\n\r\n")
    r = curl("-H", "Transfer-Encoding: chunked", "--data-binary", "x" * 5000,
             f"http://127.0.0.1:{gw.port}/echo")  # fmt: skip
    assert b"POST /echo len=5000" in r.stdout


def _policy_all(rules: str = ALL_METHODS) -> str:
    from tests.e2e.peers import policy_yaml

    return policy_yaml(0, rules).replace('port: "0"', 'port: "{port}"')


def test_expect_continue_head_and_streamed_upload(start_gateway, pybackend, nginx, tmp_path):
    gw = start_gateway(pybackend.port, _policy_all())
    data = tmp_path / "up.bin"
    data.write_bytes(b"z" * (1 << 20))
    r = curl("-v", "-H", "Expect: 100-continue", "--data-binary", f"@{data}",
             f"http://127.0.0.1:{gw.port}/upload")  # fmt: skip
    assert b"POST /upload len=1048576" in r.stdout
    assert b"HTTP/1.1 100 Continue" in r.stderr
    gw2 = start_gateway(nginx.port, _policy_all())
    r = curl("-I", f"http://127.0.0.1:{gw2.port}/public/index.html")
    assert b"200 OK" in r.stdout and b"Content-Length: 17" in r.stdout
    # HEAD then GET on one connection: the HEAD response has no body to wait for.
    out = raw_exchange(
        gw2.port,
        b"HEAD /public/index.html HTTP/1.1\r\nHost: w\r\n\r\n"
        b"GET /public/index.html HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n",
    )
    assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"hello from nginx\n")


def test_denied_expect_continue_gets_403_without_body(start_gateway, pybackend):
    gw = start_gateway(pybackend.port)
    before = len(pybackend.requests)
    r = curl("-i", "-H", "Expect: 100-continue", "--data-binary", "x" * 2000,
             f"http://127.0.0.1:{gw.port}/public/x")  # fmt: skip
    assert r.stdout.startswith(b"HTTP/1.1 403 Forbidden") and r.stdout.endswith(
        b"Access denied\r\n"
    )
    assert len(pybackend.requests) == before


def test_websocket_upgrade_tunnels_and_refused_upgrade_keeps_http(start_gateway, pybackend):
    gw = start_gateway(pybackend.port, _policy_all())
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                  b"early bytes ")  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 101")
        got = head.split(b"\r\n\r\n", 1)[1]
        s.sendall(b"then more")
        while len(got) < len(b"EARLY BYTES THEN MORE"):
            got += s.recv(4096)
        assert got == b"EARLY BYTES THEN MORE"
    out = raw_exchange(
        gw.port,
        b"GET /noupgrade HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
        b"GET /after HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    assert b"no upgrade for you" in out and b"GET /after len=0" in out


def test_h2c_upgrade_without_usable_settings_loses_its_offer_and_connect_follows_policy(
    start_gateway, pybackend
):
    # A usable h2c Upgrade becomes HTTP/2 (test_gateway_http1_h2c.py); HTTP2-Settings that do
    # not decode to whole settings used to leave it an HTTP/1 upgrade, forwarded and tunnelled
    # after the upstream's 101: an unjudged HTTP/2 tunnel (test_h2c_smuggling.py). Now the h2c
    # offer is removed from what is forwarded, so the upstream sees no Upgrade (the backend's
    # /ws answers 400 "need upgrade") and the connection stays HTTP/1.
    rules = (
        '- method: GET\n          path: "/ws.*"\n'
        "        - method: CONNECT\n          host: 'db.internal:5432'\n"
        "          path: 'db.internal:5432'"
    )
    gw = start_gateway(pybackend.port, _policy_all(rules))
    before = len(pybackend.requests)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                  b"Upgrade: h2c\r\nHTTP2-Settings: AAM\r\n\r\n")  # fmt: skip
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert head.startswith(b"HTTP/1.1 400") and b"h2c" not in head, head
    _, path, headers = pybackend.requests[before]
    names = {n.lower() for n in headers}
    assert path == "/ws" and "upgrade" not in names and "http2-settings" not in names, headers
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\nping")
        got = b""
        while not got.endswith(b"PING"):
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        assert got == b"HTTP/1.1 200 Connection established\r\n\r\nPING"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"CONNECT other:22 HTTP/1.1\r\nHost: other:22\r\n\r\n")
        assert read_response(s, bytearray()) == DENY


def test_denied_upgrade_is_not_tunnelled(start_gateway, pybackend):
    gw = start_gateway(pybackend.port)
    before = len(pybackend.requests)
    out = raw_exchange(
        gw.port,
        b"GET /ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET /public/x HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    )
    assert out.startswith(DENY)
    assert out[len(DENY) :].startswith(b"HTTP/1.1 200")
    assert [r[1] for r in pybackend.requests[before:]] == ["/public/x"]


HARDENING = {
    "cl-and-te": (b"POST /public/a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "duplicate-cl": (b"POST /public/a HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
                     b"Content-Length: 4\r\n\r\nabcd", 400),
    "bad-chunk-size": (b"POST /public/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                       b"\r\nzz\r\n", 400),
    "te-not-chunked": (b"POST /public/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
    "te-chunked-gzip": (b"POST /public/a HTTP/1.1\r\nHost: a\r\n"
                        b"Transfer-Encoding: chunked, gzip\r\n\r\n", 400),
    "obs-fold": (b"GET /public/a HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
    "space-before-colon": (b"GET /public/a HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    "ctl-in-name": (b"GET /public/a HTTP/1.1\r\nHost: a\r\nX\x01A: b\r\n\r\n", 400),
    "ctl-in-value": (b"GET /public/a HTTP/1.1\r\nHost: a\r\nX-A: b\x07c\r\n\r\n", 400),
    "bare-cr": (b"GET /public/a HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400),
    "invalid-method": (b"G@T /public/a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    "no-host": (b"GET /public/a HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (b"GET /public/a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "huge-header": (b"GET /public/a HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
                    431),
    "many-headers": (b"GET /public/a HTTP/1.1\r\nHost: a\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431),
    "long-uri": (b"GET /public/" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
}  # fmt: skip


def test_hardening_every_case_answered_and_nothing_forwarded(start_gateway, pybackend):
    gw = start_gateway(pybackend.port, _policy_all())
    before = len(pybackend.requests)
    for name, (request, status) in HARDENING.items():
        out = raw_exchange(gw.port, request)
        assert out.startswith(b"HTTP/1.1 %d " % status), (name, out[:80])
        assert b"connection: close" in out.lower(), name
    # Only the bad chunk size has a valid head, which may stream before its body is seen; its
    # body never reaches the backend (the upstream connection is closed on the error).
    assert [r[:2] for r in pybackend.requests[before:]] in ([], [("POST", "/public/a")])
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics").read().decode()
    assert f'policy_l7_total{{rule="parse_errors",proto="http"}} {len(HARDENING)}' in metrics


def test_slow_headers_get_408(start_gateway, pybackend, tmp_path):
    cfg = tmp_path / "limits.yaml"
    cfg.write_text("limits: {header_timeout: 0.5}\n")
    gw = start_gateway(pybackend.port, None, "-c", str(cfg))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"GET /public/a HTTP/1.1\r\nHost: a\r\n")
        t0 = time.monotonic()
        out = b""
        while chunk := s.recv(4096):
            out += chunk
    assert out.startswith(b"HTTP/1.1 408 Request Timeout")
    assert 0.4 < time.monotonic() - t0 < 10


def test_upstream_refused_503_timeout_504_reset_closes(start_gateway, pybackend, tmp_path):
    from tests.e2e.peers import free_port

    dead = free_port()
    gw = start_gateway(dead, _policy_all())
    r = curl("-s", "-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{gw.port}/a")
    assert r.stdout == b"503"
    cfg = tmp_path / "timeouts.yaml"
    cfg.write_text("limits: {upstream_response_timeout: 0.5}\n")
    gw2 = start_gateway(pybackend.port, _policy_all(), "-c", str(cfg))
    r = curl("-s", "-w", "%{http_code}", "-o", "/dev/null", f"http://127.0.0.1:{gw2.port}/slow/3")
    assert r.stdout == b"504"
    out = raw_exchange(gw2.port, b"GET /reset HTTP/1.1\r\nHost: a\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"partial")  # then closed
    reasons = {f.get("drop_reason_desc") for f in gw.wait_flows(1) + gw2.wait_flows(2)}
    assert {"UPSTREAM_REFUSED", "UPSTREAM_TIMEOUT", "UPSTREAM_RESET"} <= reasons
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw2.admin_port}/metrics").read().decode()
    assert 'l7proxy_upstream_errors_total{proto="http",kind="timeout"} 1' in metrics
    assert 'l7proxy_upstream_errors_total{proto="http",kind="reset"} 1' in metrics


L4_ONLY_FROM_10 = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromCIDR:
    - 10.0.0.0/8
    toPorts:
    - ports:
      - port: "{port}"
        protocol: TCP
  - fromEndpoints:
    - matchLabels:
        app: client
    toPorts:
    - ports:
      - port: "{port}"
        protocol: TCP
      rules:
        http:
        - method: GET
          path: "/public/.*"
"""


def test_l3l4_denied_source_is_reset_with_dropped_flow(start_gateway, pybackend):
    gw = start_gateway(pybackend.port, L4_ONLY_FROM_10)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        time.sleep(0.2)  # the gateway resets on accept, before any byte
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            s.sendall(get(gw.port, "/public/l4-denied"))
            s.recv(100)
    flow = gw.wait_flows(1)[-1]
    assert "/public/l4-denied" not in [r[1] for r in pybackend.requests]
    assert flow["verdict"] == "DROPPED" and flow["event_type"] == "L3_L4", flow
    assert flow["drop_reason_desc"] == "POLICY_DENIED" and flow["source"]["identity"] == 2
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{gw.admin_port}/metrics").read().decode()
    assert "l7proxy_l4_denied_total 1" in metrics


def test_peer_cidr_gives_the_source_identity(start_gateway, pybackend):
    gw = start_gateway(
        pybackend.port, L4_ONLY_FROM_10, "--peer", "127.0.0.0/8=app=client",
        "--peer", "0.0.0.0/0=app=nobody",
    )  # fmt: skip
    out = raw_exchange(
        gw.port, get(gw.port, "/public/x").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    )
    assert out.startswith(b"HTTP/1.1 200")
    out = raw_exchange(
        gw.port, get(gw.port, "/private").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    )
    assert out == DENY
    flow = gw.wait_flows(2)[0]
    assert flow["source"]["identity"] > 255 and any(
        "app=client" in lb for lb in flow["source"]["labels"]
    )


HEADER_RULES = """- method: GET
          path: "/.*"
          headerMatches:
          - name: X-Added
            value: "yes"
            mismatch: ADD
          - name: X-Gone
            value: "keep"
            mismatch: DELETE
          - name: X-Token
            value: "right"
            mismatch: REPLACE
          - name: X-Watched
            value: "secret-value"
            mismatch: LOG"""


def test_header_match_actions_edit_the_forwarded_request(start_gateway, pybackend):
    gw = start_gateway(pybackend.port, _policy_all(HEADER_RULES))
    out = raw_exchange(
        gw.port,
        b"GET /h HTTP/1.1\r\nHost: web\r\nX-Gone: 1\r\nX-Token: wrong\r\nX-Watched: other\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert out.startswith(b"HTTP/1.1 200"), out
    seen = pybackend.requests[-1][2]
    lower = {k.lower(): v for k, v in seen.items()}
    assert lower["x-added"] == "yes" and lower["x-token"] == "right" and "x-gone" not in lower
    assert lower["x-watched"] == "other"  # LOG only logs
    flows = json.dumps(gw.wait_flows(1))
    assert "secret-value" not in flows and "other" not in flows
    assert gw.flows()[-1]["l7"]["http"]["headers"] == [{"key": "X-Watched", "value": "[mismatch]"}]


def test_large_response_streams_intact_and_http10_closes(start_gateway, nginx):
    import hashlib
    from pathlib import Path

    gw = start_gateway(nginx.port)
    want = hashlib.sha256(Path(nginx.dir, "html", "public", "big.bin").read_bytes()).hexdigest()
    r = curl("--limit-rate", "20M", f"http://127.0.0.1:{gw.port}/public/big.bin")
    assert hashlib.sha256(r.stdout).hexdigest() == want
    out = raw_exchange(gw.port, b"GET /public/index.html HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"hello from nginx\n")


def test_pipelined_posts_with_bodies_keep_their_framing(start_gateway, pybackend):
    gw = start_gateway(pybackend.port, _policy_all())
    batch = (
        b"POST /one HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"POST /two HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
        b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    out = raw_exchange(gw.port, batch)
    assert out.count(b"HTTP/1.1 200") == 3
    assert out.index(b"POST /one len=3") < out.index(b"POST /two len=2") < out.index(b"GET /three")
