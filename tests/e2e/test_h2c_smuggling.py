"""h2c smuggling through `l7proxy gateway --protocol http` in front of a real h2c upstream: Go's
golang.org/x/net/http2/h2c handler (built here from Debian's golang-golang-x-net-dev, which
`make setup` installs for h2spec), serving `/admin` as a secret. Policy: only `GET /public/.*`.

An h2c Upgrade the proxy takes over itself (the first request of a connection, no body) becomes an
HTTP/2 session the proxy judges stream by stream. One it did not take over (pipelined behind
another request) used to be forwarded with its `Upgrade: h2c` offer: Go answered 101, the
connection became a raw tunnel, and an HTTP/2 `GET /admin` sent next was served unjudged. The
offer is now stripped from what is forwarded, so the upstream answers in HTTP/1.1. The same for
`Upgrade: h2c` with `Connection: HTTP2-Settings` but no `upgrade` token, which Go upgrades and
the proxy's parser does not take for an upgrade, pipelined or not.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import pytest

from tests.conftest import IN_CI
from tests.e2e.peers import Gateway, free_port, policy_yaml, wait_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

GOPATH = "/usr/share/gocode"
SERVER = """package main

import (
	"fmt"
	"net/http"
	"os"
	"strings"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

func main() {
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(os.Stderr, "%s %s\\n", r.Proto, r.URL.RequestURI())
		if strings.HasPrefix(r.URL.Path, "/admin") {
			fmt.Fprintf(w, "SECRET admin\\n")
			return
		}
		fmt.Fprintf(w, "ok %s\\n", r.URL.Path)
	})
	h := h2c.NewHandler(mux, &http2.Server{})
	http.ListenAndServe("127.0.0.1:"+os.Args[1], h)
}
"""


@pytest.fixture(scope="module")
def go_h2c(tmp_path_factory):
    go = shutil.which("go")
    if go is None or not Path(GOPATH, "src/golang.org/x/net/http2/h2c").is_dir():
        if IN_CI:
            pytest.fail("go or golang.org/x/net/http2/h2c missing (make setup installs them)")
        pytest.skip("go or golang.org/x/net/http2/h2c missing (run make setup)")
    tmp = tmp_path_factory.mktemp("h2c")
    (tmp / "main.go").write_text(SERVER)
    env = {**os.environ, "GOPATH": GOPATH, "GO111MODULE": "off", "GOCACHE": str(tmp / "cache")}
    subprocess.run([go, "build", "-o", str(tmp / "h2cserver"), "."], cwd=tmp, env=env,
                   check=True, capture_output=True, timeout=110)  # fmt: skip
    port = free_port()
    log = tmp / "server.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(tmp / "h2cserver"), str(port)], stderr=err,
                                stdout=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    wait_port(port)
    policy = tmp / "policy.yaml"
    gw_port = free_port()
    policy.write_text(policy_yaml(gw_port))
    gw = Gateway(["--listen", f"127.0.0.1:{gw_port}", "--upstream", f"127.0.0.1:{port}",
                  "--policy", str(policy), "--labels", "app=web", "--protocol", "http"])  # fmt: skip
    yield gw, log
    gw.stop()
    proc.terminate()
    proc.wait(10)


def _upgrade_then_get_admin(
    port: int, before: bytes, connection: bytes = b"Upgrade, HTTP2-Settings"
) -> tuple[bytes, list[tuple]]:
    """Send `before`, then an h2c Upgrade for /public/x; if the answer has a 101, an HTTP/2
    GET /admin on the same connection. (everything read, the HTTP/2 events (kind, ...))."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection()
    upgrade = (
        b"GET /public/x HTTP/1.1\r\nHost: web\r\nConnection: " + connection + b"\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: " + settings + b"\r\n\r\n"
    )
    events: list[tuple] = []
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(before + upgrade)
        buf = b""
        end = time.monotonic() + 3
        want = 2 if before else 1  # complete answers expected before deciding
        while time.monotonic() < end and buf.count(b"\r\n\r\n") < want:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            buf += chunk
        if b" 101 " not in buf:
            s.settimeout(0.5)
            try:
                while chunk := s.recv(65536):
                    buf += chunk
            except TimeoutError:
                pass
            return buf, events
        data = buf.split(b" 101 ", 1)[1].split(b"\r\n\r\n", 1)[1]
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                (":authority", "web"), (":path", "/admin")], end_stream=True)  # fmt: skip
        s.sendall(conn.data_to_send())
        while True:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    events.append(("status", ev.stream_id, dict(ev.headers)[b":status"]))
                elif isinstance(ev, h2.events.DataReceived):
                    events.append(("data", ev.stream_id, ev.data))
                elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                    return buf, events
            s.sendall(conn.data_to_send())
            try:
                data = s.recv(65536)
            except TimeoutError:
                return buf, events
            if not data:
                return buf, events


def test_the_h2c_upgrade_the_proxy_takes_over_is_judged_stream_by_stream(go_h2c):
    gw, _ = go_h2c
    _, events = _upgrade_then_get_admin(gw.port, b"")
    assert ("status", 3, b"403") in events
    assert not any(b"SECRET" in e[2] for e in events if e[0] == "data")


@pytest.mark.parametrize(
    "connection",
    [
        b"Upgrade, HTTP2-Settings",
        # Go upgrades on these too; the parser does not take them for an upgrade.
        b"HTTP2-Settings",
        b"keep-alive, HTTP2-Settings",
    ],
)
def test_a_pipelined_h2c_upgrade_does_not_open_an_unjudged_tunnel(go_h2c, connection):
    gw, log = go_h2c
    seen = len(log.read_text())
    before = b"GET /public/x HTTP/1.1\r\nHost: web\r\n\r\n"
    raw, events = _upgrade_then_get_admin(gw.port, before, connection)
    assert b"SECRET" not in raw and not any(b"SECRET" in e[2] for e in events if e[0] == "data")
    assert b" 101 " not in raw, raw
    assert raw.count(b"HTTP/1.1 200 OK") == 2, raw  # both answered by Go, in HTTP/1.1
    time.sleep(0.2)
    assert log.read_text()[seen:].splitlines() == ["HTTP/1.1 /public/x"] * 2


def test_an_h2c_offer_without_connection_upgrade_does_not_open_an_unjudged_tunnel(go_h2c):
    gw, log = go_h2c
    seen = len(log.read_text())
    raw, events = _upgrade_then_get_admin(gw.port, b"", b"HTTP2-Settings")
    assert b"SECRET" not in raw and not any(b"SECRET" in e[2] for e in events if e[0] == "data")
    assert b" 101 " not in raw and raw.count(b"HTTP/1.1 200 OK") == 1, raw
    time.sleep(0.2)
    assert log.read_text()[seen:].splitlines() == ["HTTP/1.1 /public/x"]
