"""Path normalization end to end (issues 4 and 5): with `GET /public/.*` allowed, a dot-segment
target such as `/public/../private/x` is judged as /private/x (403, never reaches the backend),
and an allowed one reaches the backend normalized. HTTP/1 with raw sockets to the Python backend
(which resolves nothing itself: it records the path it got), HTTP/2 with curl --path-as-is to an
h2c backend that records `:path`."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading

import h2.config
import h2.connection
import h2.events
import pytest

from tests.conftest import need_binary
from tests.e2e.peers import raw_exchange

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DENIED = ["/public/../private/x", "/public/%2e%2e/private/x", "/public/.%2E/private", "/public/./../private"]  # fmt: skip


def one_response(port: int, target: str) -> bytes:
    """The response to one GET (the connection is closed by the client's Connection: close)."""
    req = f"GET {target} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n".encode()
    return raw_exchange(port, req)


def test_http1_dot_segments_are_judged_and_forwarded_normalized(start_gateway, pybackend):
    gw = start_gateway(pybackend.port)
    seen = len(pybackend.requests)
    for target in DENIED:
        out = one_response(gw.port, target)
        assert out.startswith(b"HTTP/1.1 403 Forbidden"), (target, out)
    out = one_response(gw.port, "/%2e%2e/x")
    assert out.startswith(b"HTTP/1.1 400 "), out
    out = one_response(gw.port, "/public/./a/../b")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"GET /public/b len=0" in out, out
    out = one_response(gw.port, "http://api:81/public/%7e/../c?x=/../%2e")  # absolute-form
    assert b"GET /public/c?x=/../%2e len=0" in out and b"host: api:81" in out, out
    paths = [path for _, path, _ in pybackend.requests[seen:]]
    assert paths == ["/public/b", "/public/c?x=/../%2e"]  # the denied ones never arrived
    flows = gw.wait_flows(len(DENIED) + 3)
    urls = {(f["verdict"], f["l7"]["http"].get("url")) for f in flows}
    assert ("DROPPED", "/private/x") in urls and ("FORWARDED", "/public/b") in urls


def test_http1_pipelined_normalized_request_keeps_the_connection(start_gateway, pybackend):
    gw = start_gateway(pybackend.port)
    seen = len(pybackend.requests)
    reqs = b"".join(
        b"GET %s HTTP/1.1\r\nHost: web\r\n\r\n" % t
        for t in (b"/public/x/..", b"/public/../private/x", b"/public/%41")
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(reqs + b"GET /public/end HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.count(b"HTTP/1.1 200 OK") == 3 and out.count(b"HTTP/1.1 403 Forbidden") == 1
    assert out.index(b"GET /public/ len=0") < out.index(b"403 Forbidden") < out.index(b"/public/A")
    paths = [path for _, path, _ in pybackend.requests[seen:]]
    assert paths == ["/public/", "/public/A", "/public/end"]


# ---- HTTP/2 -------------------------------------------------------------------------------------


class H2PathBackend:
    """An h2c (prior knowledge) server that answers 200 with body `path=<:path>` and records
    every :path it got."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.paths: list[str] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        h2conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        h2conn.initiate_connection()
        with conn, contextlib.suppress(ConnectionError):
            # (the proxy may reset its upstream when the client is done: that ends the serving)
            conn.sendall(h2conn.data_to_send())
            while data := conn.recv(65536):
                for ev in h2conn.receive_data(data):
                    if isinstance(ev, h2.events.RequestReceived):
                        path = dict(ev.headers)[":path"]
                        self.paths.append(path)
                        body = f"path={path}".encode()
                        h2conn.send_headers(
                            ev.stream_id,
                            [(":status", "200"), ("content-length", str(len(body)))],
                        )
                        h2conn.send_data(ev.stream_id, body, end_stream=True)
                conn.sendall(h2conn.data_to_send())

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def h2_backend():
    server = H2PathBackend()
    yield server
    server.stop()


def h2_get(port: int, target: str) -> tuple[str, bytes]:
    r = subprocess.run(
        [need_binary("curl"), "-sS", "--max-time", "10", "--http2-prior-knowledge",
         "--path-as-is", "-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:{port}{target}"],
        capture_output=True, timeout=20,
    )  # fmt: skip
    body, _, code = r.stdout.rpartition(b"\n")
    return code.decode(), body


def test_http2_dot_segments_are_judged_and_forwarded_normalized(start_gateway, h2_backend):
    gw = start_gateway(h2_backend.port, None, "--protocol", "http2")
    for target in DENIED:
        code, body = h2_get(gw.port, target)
        assert code == "403" and body == b"Access denied\r\n", (target, code, body)
    assert h2_get(gw.port, "/%2e%2e/x")[0] == "400"
    assert h2_get(gw.port, "/public/./a/../b") == ("200", b"path=/public/b")
    # %2F is a slash (the default `unescape` mode, issue 19), then `//` is merged
    assert h2_get(gw.port, "/public/%7e%2f/x/.?q=%2e") == ("200", b"path=/public/~/x/?q=%2e")
    assert h2_backend.paths == ["/public/b", "/public/~/x/?q=%2e"]
