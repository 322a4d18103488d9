"""The proxy worker's compact flows (l7proxy/agent/flow_wire.py): what the agent rebuilds is
what the worker's sessions emitted, in order, key for key."""

from __future__ import annotations

import json
from types import SimpleNamespace

from l7proxy.agent import proxy_worker_process
from l7proxy.agent.flow_wire import FlowEncoder
from l7proxy.agent.proxy_worker_control import WorkerHandle
from l7proxy.agent.proxy_worker_process import Uplink
from l7proxy.config import ProxyConfig
from l7proxy.context import ConnContext, OriginalDestination
from l7proxy.metrics import ProxyMetrics

HTTP = {
    "type": "RESPONSE",
    "latency_ns": 1500,
    "http": {"code": 200, "method": "GET", "url": "/public/a", "protocol": "HTTP/1.1"},
}


def ctx(port: int) -> ConnContext:
    return ConnContext(
        config=ProxyConfig(),
        client=("10.0.0.2", port),
        listener_port=80,
        destination=OriginalDestination("10.0.0.3", 80),
        source_identity=1234,
        source_labels=("k8s:app=client",),
        destination_identity=1235,
        destination_labels=("k8s:app=web",),
        rules=lambda: None,
        flows=None,
        metrics=ProxyMetrics(),
    )


def agent_side() -> tuple[WorkerHandle, list[dict]]:
    got: list[dict] = []
    agent = SimpleNamespace(flows=SimpleNamespace(ingest=got.append))
    return WorkerHandle(agent, pid=0, port=0, reused=False), got


def deliver(handle: WorkerHandle, data: bytes, args: dict) -> None:
    for line in data.splitlines():
        handle.uplink(args, json.loads(line))


def test_compact_flows_arrive_as_the_dicts_sent_in_order_with_shared_peers():
    a, b = ctx(5555), ctx(6666)
    sent = [
        a.flow("FORWARDED", HTTP, "HTTP/1.1 200 0ms (GET /public/a)"),
        {"n": 1},  # not a proxy flow: goes whole, in its place
        b.flow("DROPPED", None, "TCP denied", drop_reason="POLICY_DENIED", event_type="L3_L4"),
        a.flow("FORWARDED", HTTP, "again"),
    ]
    uplink = Uplink()
    for flow in sent:
        uplink.ingest(flow)
    data = uplink.encode(uplink.take(), FlowEncoder())
    kinds = [next(iter(json.loads(line))) for line in data.splitlines()]
    assert kinds == ["peers", "flows", "flow", "peers", "flows"]
    # The acknowledgement numbers lines: the flows wait on the line that carried them.
    assert [n for n, _ in uplink.inflight] == [2, 3, 5, 5] and uplink.sent == 5
    handle, got = agent_side()
    deliver(handle, data, {})
    expected = json.loads(json.dumps(sent))
    assert got == expected and [list(f) for f in got] == [list(f) for f in expected]
    assert got[0]["source"] is got[3]["source"]  # one dict per connection, as inline


def test_each_channel_connection_sends_its_peers_again_and_rows_without_them_are_dropped():
    a = ctx(5555)
    uplink = Uplink()

    def send(summary: str, encoder: FlowEncoder) -> bytes:
        uplink.ingest(a.flow("FORWARDED", HTTP, summary))
        return uplink.encode(uplink.take(), encoder)

    connection = FlowEncoder()
    first, second = send("one", connection), send("two", connection)
    again = send("three", FlowEncoder())  # the next agent connection
    assert b'"peers"' in first and b'"peers"' not in second and b'"peers"' in again
    handle, got = agent_side()
    deliver(handle, second, {})  # an agent connection that never saw the peers line
    assert got == []
    args: dict = {}
    deliver(handle, first + second, args)
    deliver(handle, again, {})
    assert [f["Summary"] for f in got] == ["one", "two", "three"]


def test_a_long_backlog_goes_in_lines_of_bounded_size(monkeypatch):
    monkeypatch.setattr(proxy_worker_process, "FLOWS_PER_LINE", 4)
    a = ctx(5555)
    uplink = Uplink()
    for n in range(10):
        uplink.ingest(a.flow("FORWARDED", HTTP, f"#{n}"))
    data = uplink.encode(uplink.take(), FlowEncoder())
    rows = [len(json.loads(line).get("flows", [])) for line in data.splitlines()]
    assert rows == [0, 4, 4, 2]  # the peers line, then at most 4 flows a line
    handle, got = agent_side()
    deliver(handle, data, {})
    assert [f["Summary"] for f in got] == [f"#{n}" for n in range(10)]
