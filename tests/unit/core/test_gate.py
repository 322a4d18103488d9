"""Playbooks for the accept gate: L3/L4 verdict, sniffing, hand-off; and the deadline sweeper."""

import asyncio
import io
import json
import time
from types import SimpleNamespace

from l7proxy import protocols
from l7proxy.config import ProxyConfig
from l7proxy.flows import FlowSink
from l7proxy.metrics import ProxyMetrics
from l7proxy.server import DeadlineSweeper, Gate, Listener, static_destination
from tests.unit.http1.playbook import FakeTransport


class PeerTransport(FakeTransport):
    def __init__(self, peer=("10.1.2.3", 4444)):
        super().__init__()
        self.peer = peer
        self.protocol = None
        self.sock = SimpleNamespace(options=[], setsockopt=lambda *a: self.sock.options.append(a))

    def get_extra_info(self, name, default=None):
        return {"peername": self.peer, "socket": self.sock}.get(name, default)

    def set_protocol(self, protocol):
        self.protocol = protocol


class Recorder:
    """A protocol session that records what the gate gave it."""

    def __init__(self, ctx, first):
        self.ctx, self.first, self.data, self.transport = ctx, first, [], None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data.append(data)


def make_listener(action="allow", protocol="http-test", identity=2, config=None):
    out = io.StringIO()
    decision = SimpleNamespace(action=action, identity=identity, labels=("reserved:world",))
    return Listener(
        port=8080,
        protocol=protocol,
        destination=static_destination("127.0.0.1", 9000),
        classify=lambda ip: decision,
        rules_for=lambda ip: lambda: None,
        endpoint=lambda: (256, ("k8s:app=web",)),
        config=config or ProxyConfig(),
        flows=FlowSink(stream=out),
        metrics=ProxyMetrics(),
        sweeper=DeadlineSweeper(),
        upstreams=None,
    ), out


protocols.register("http-test", Recorder)


def test_allowed_connection_is_handed_to_the_protocol_session():
    lst, _ = make_listener()
    t = PeerTransport()
    Gate(lst).connection_made(t)
    session = t.protocol
    assert isinstance(session, Recorder) and session.transport is t
    assert session.ctx.client_ip == "10.1.2.3" and session.ctx.listener_port == 8080
    assert session.ctx.destination.port == 9000 and session.ctx.destination_identity == 256
    assert 'l7proxy_active_connections{proto="http-test"} 1' in lst.metrics.render()


def test_l4_denied_connection_is_reset_with_a_dropped_flow():
    lst, out = make_listener(action="deny")
    t = PeerTransport()
    Gate(lst).connection_made(t)
    assert t.aborted and t.protocol is None
    assert t.sock.options and t.sock.options[0][2] == b"\x01\x00\x00\x00\x00\x00\x00\x00"
    lst.flows.flush()
    flow = json.loads(out.getvalue())
    assert flow["verdict"] == "DROPPED" and flow["event_type"] == "L3_L4"
    assert flow["source"]["ip"] == "10.1.2.3" and flow["l4"]["TCP"]["destination_port"] == 8080


def test_auto_sniffs_then_hands_over_the_first_bytes():
    protocols.register("http", Recorder)  # stand-in for the real HTTP/1 session
    try:
        lst, _ = make_listener(protocol="auto")
        t = PeerTransport()
        gate = Gate(lst)
        gate.connection_made(t)
        assert t.protocol is None
        gate.data_received(b"GE")
        assert t.protocol is None
        gate.data_received(b"T / HTTP/1.1\r\n")
        assert isinstance(t.protocol, Recorder)
        assert (
            t.protocol.data == [b"GET / HTTP/1.1\r\n"] and t.protocol.first == b"GET / HTTP/1.1\r\n"
        )
        bad = PeerTransport()
        gate = Gate(lst)
        gate.connection_made(bad)
        gate.data_received(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")
        assert bad.closed and bad.protocol is None
    finally:
        protocols._FACTORIES.pop("http", None)


def test_undecided_bytes_past_the_configured_sniff_limit_close_the_connection():
    start = b"PRI * HTTP/2.0\r\n"  # 16 bytes of the HTTP/2 preface: not decided yet
    for limit, closed in ((64, False), (8, True)):
        lst, _ = make_listener(protocol="auto", config=ProxyConfig(sniff_max_bytes=limit))
        t = PeerTransport()
        gate = Gate(lst)
        gate.connection_made(t)
        gate.data_received(start)
        assert t.closed is closed and t.protocol is None


def test_deadline_sweeper_calls_due_sessions_only():
    class S:
        def __init__(self, due):
            self.deadline_kind = 1
            self.deadline = time.monotonic() + (-1 if due else 60)
            self.fired = False

        def on_deadline(self):
            self.fired = True
            self.deadline_kind = 0

    async def run():
        sweeper = DeadlineSweeper(interval=0.01)
        due, later = S(True), S(False)
        sweeper.add(due)
        sweeper.add(later)
        sweeper.start()
        await asyncio.sleep(0.05)
        sweeper.stop()
        return due.fired, later.fired

    assert asyncio.run(run()) == (True, False)
