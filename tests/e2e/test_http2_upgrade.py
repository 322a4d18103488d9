"""h2c Upgrade from HTTP/1.1: `take_over_h2c` (the hand-over the HTTP/1 session calls) with curl
and nghttp as clients and nginx (HTTP/2 prior knowledge) as the upstream.

The listener here is a minimal HTTP/1 reader in the test, so the hand-over is tested on its own;
the gateway's HTTP/1 session uses the same function."""

from __future__ import annotations

import asyncio
import subprocess
import threading

import pytest

from l7proxy.config import ProxyConfig
from l7proxy.context import ConnContext, OriginalDestination
from l7proxy.flows import FlowSink
from l7proxy.http2.upgrade import decode_http2_settings, take_over_h2c, wants_h2c
from l7proxy.metrics import ProxyMetrics
from policies import HttpRuleSet
from policies.model import HttpRule
from tests.conftest import need_binary
from tests.e2e.test_http2 import nginx_h2  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


class MiniHttp1(asyncio.Protocol):
    """Reads one request head and hands the connection to HTTP/2 when it asks for h2c."""

    def __init__(self, make_ctx, sessions: list) -> None:
        self.make_ctx = make_ctx
        self.sessions = sessions
        self.buf = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers = [tuple(p.strip() for p in line.split(":", 1)) for line in lines[1:]]
        session = take_over_h2c(
            self.make_ctx(), self.transport, method, target, headers, b"", rest, previous=self
        )
        if session is None:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()
        self.sessions.append(session)


@pytest.fixture
def upgrade_listener(nginx_h2):  # noqa: F811
    rules = HttpRuleSet([HttpRule(method="GET", path="/public/.*")])
    metrics = ProxyMetrics()
    sessions: list = []
    loop = asyncio.new_event_loop()

    def make_ctx():
        return ConnContext(
            config=ProxyConfig(),
            client=("127.0.0.1", 1),
            listener_port=0,
            destination=OriginalDestination("127.0.0.1", nginx_h2.port),
            source_identity=2,
            source_labels=(),
            destination_identity=256,
            destination_labels=(),
            rules=lambda: rules,
            flows=FlowSink(None),
            metrics=metrics,
        )

    server = loop.run_until_complete(
        loop.create_server(lambda: MiniHttp1(make_ctx, sessions), "127.0.0.1", 0)
    )
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield port, metrics, sessions
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    server.close()


def test_http2_settings_header_parsing():
    assert wants_h2c([("Upgrade", "h2c"), ("HTTP2-Settings", "AAMAAABkAAQAoAAAAAIAAAAA")])
    assert not wants_h2c([("Upgrade", "websocket"), ("HTTP2-Settings", "")])
    assert not wants_h2c([("Upgrade", "h2c")])
    assert decode_http2_settings("AAMAAABkAAQAoAAAAAIAAAAA") == bytes.fromhex(
        "000300000064000400a00000000200000000"
    )
    assert decode_http2_settings("AAM") is None  # not a whole number of settings


def test_curl_upgrade_allowed_and_denied(upgrade_listener):
    port, metrics, sessions = upgrade_listener
    curl = need_binary("curl")
    ok = subprocess.run(
        [curl, "-sS", "--http2", "--max-time", "10", "-w", " %{http_version} %{http_code}",
         f"http://127.0.0.1:{port}/public/index.html"],
        capture_output=True, check=False,
    )  # fmt: skip
    assert ok.stdout == b"hello from nginx\n 2 200", ok.stderr
    denied = subprocess.run(
        [curl, "-sS", "--http2", "--max-time", "10", "-w", " %{http_version} %{http_code}",
         f"http://127.0.0.1:{port}/private.html"],
        capture_output=True, check=False,
    )  # fmt: skip
    assert denied.stdout == b"Access denied\r\n 2 403", denied.stderr
    assert len(sessions) == 2 and all(s is not None for s in sessions)
    text = metrics.render()
    assert 'policy_l7_total{rule="forwarded",proto="http2"} 1' in text
    assert 'policy_l7_total{rule="denied",proto="http2"} 1' in text


def test_nghttp_upgrade_then_more_streams(upgrade_listener):
    port, _, _ = upgrade_listener
    out = subprocess.run(
        [need_binary("nghttp"), "-u", "-ns", "-t", "10",
         f"http://127.0.0.1:{port}/public/index.html", f"http://127.0.0.1:{port}/private.html",
         f"http://127.0.0.1:{port}/public/index.html?again=1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [
        ln.split() for ln in out.stdout.splitlines() if ln.split()[:1] and ln.split()[0].isdigit()
    ]
    status = {row[-1]: row[-3] for row in rows}
    assert status == {
        "/public/index.html": "200",
        "/private.html": "403",
        "/public/index.html?again=1": "200",
    }
