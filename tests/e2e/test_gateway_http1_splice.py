"""Large HTTP/1 bodies through `l7proxy gateway` with splice(2) (l7proxy/http1/bodies.py): exact
bytes both ways, the pipelined requests after a spliced body judged, the idle timeout during a
spliced upload, a short upstream response."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import pytest

from tests.e2e.test_gateway_http1 import DENY, _policy_all, get, read_response

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

MIB = 1024 * 1024


def varied(n: int) -> bytes:
    block = bytes(i % 253 for i in range(65536))
    return (block * (n // len(block) + 1))[:n]


def test_spliced_upload_exact_and_pipelined_requests_after_it_judged(start_gateway, pybackend):
    rules = '- method: POST\n          path: "/up.*"\n        - method: GET\n          path: "/public/.*"'
    gw = start_gateway(pybackend.port, _policy_all(rules))
    data = varied(4 * MIB)
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(data))
        s.sendall(data[: MIB + 7])
        time.sleep(0.05)
        # The last body bytes, then a denied request and an allowed one in the same send.
        s.sendall(data[MIB + 7 :] + get(gw.port, "/private/x") + get(gw.port, "/public/y"))
        buf = bytearray()
        first = read_response(s, buf)
        assert first.startswith(b"HTTP/1.1 200 OK")
        echoed = first.split(b"\r\n\r\n", 1)[1]
        assert echoed.startswith(b"POST /up len=%d\n" % len(data))
        assert echoed.endswith(b"\n\n" + data)  # the echo ends with the body as it arrived
        assert read_response(s, buf) == DENY
        assert b"GET /public/y len=0" in read_response(s, buf)
    paths = [path for _, path, _ in pybackend.requests[-2:]]
    assert paths == ["/up", "/public/y"]  # /private/x never reached the backend
    verdicts = [(f["verdict"], f["l7"]["http"]["url"]) for f in gw.wait_flows(3)]
    assert verdicts[-3:] == [("FORWARDED", "/up"), ("DROPPED", "/private/x"),
                             ("FORWARDED", "/public/y")]  # fmt: skip


def test_spliced_download_exact_twice_on_one_connection(start_gateway, nginx):
    gw = start_gateway(nginx.port)
    big = Path(nginx.dir, "html", "public", "big.bin").read_bytes()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        buf = bytearray()
        for _ in range(2):
            s.sendall(get(gw.port, "/public/big.bin"))
            out = read_response(s, buf)
            head, _, got = out.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert hashlib.sha256(got).digest() == hashlib.sha256(big).digest()
        s.sendall(get(gw.port, "/private.html"))
        assert read_response(s, buf) == DENY


def test_client_stopping_mid_spliced_upload_is_cut_at_the_idle_timeout(
    start_gateway, pybackend, tmp_path
):
    cfg = tmp_path / "limits.yaml"
    cfg.write_text("limits: {idle_timeout: 1, sweep_interval: 0.1}\n")
    gw = start_gateway(pybackend.port, _policy_all(), "-c", str(cfg))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        s.sendall(b"POST /stall HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (2 * MIB))
        s.sendall(varied(512 * 1024))
        t0 = time.monotonic()
        assert s.recv(4096) == b""  # closed without an answer: the request never ended
        assert 0.8 < time.monotonic() - t0 < 5


def test_short_upstream_response_cuts_the_client_and_is_an_error_flow(start_gateway, pybackend):
    gw = start_gateway(pybackend.port, _policy_all())
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as s:
        # /reset promises 100000 bytes, sends 7 and resets: too little to splice, so the same
        # on both paths; /slow/0 with a 1 MiB body is spliced first on this connection.
        s.sendall(b"POST /slow/0 HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % MIB)
        s.sendall(varied(MIB))
        assert b"slow done" in read_response(s, bytearray())
        s.sendall(get(gw.port, "/reset"))
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"partial")
    flows = gw.wait_flows(2)
    assert any(f["verdict"] == "ERROR" for f in flows)
