"""The proxy worker's compact flows (l7proxy/agent/flow_wire.py): what the agent rebuilds is
what the worker's sessions emitted, in order, key for key."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from l7proxy.agent import proxy_worker_process
from l7proxy.agent.flow_wire import FlowDecoder, FlowEncoder
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


def test_http_flows_go_as_their_fields_and_come_back_unbuilt_equal_to_the_workers():
    """An HTTP/1 flow not built (HttpFlow) crosses as an "http" row: the agent gets an HttpFlow
    again (the first of its connection marked, to be built at once), whose dict is the one the
    worker would have built; a row of the wrong shape is refused."""
    from l7proxy.flows import HttpFlow

    a = ctx(5555)
    src, dst = a.peers()
    sent = [
        HttpFlow(src, dst, 5555, 80, "INGRESS", "FORWARDED", b"GET", b"/public/a", b"1.1",
                 200, 1500, (), 1_700_000_000_123_456_789),
        HttpFlow(src, dst, 5555, 80, "INGRESS", "DROPPED", b"GET", b"/private/x", b"1.1",
                 403, 900, ("X-Token",), 1_700_000_001_000_000_000),
    ]  # fmt: skip
    uplink = Uplink()
    for flow in sent:
        uplink.ingest_pending(flow)
    data = uplink.encode(uplink.take(), FlowEncoder())
    assert [next(iter(json.loads(line))) for line in data.splitlines()] == ["peers", "flows"]
    got: list = []
    agent = SimpleNamespace(flows=SimpleNamespace(ingest=got.append, ingest_pending=got.append))
    deliver(WorkerHandle(agent, pid=0, port=0, reused=False), data, {})
    assert [type(f) for f in got] == [HttpFlow, HttpFlow] and [f.first for f in got] == [
        True,
        False,
    ]
    assert [f.flow() for f in got] == json.loads(json.dumps([f.flow() for f in sent]))
    assert got[1].flow()["l7"]["http"]["headers"] == [{"key": "X-Token", "value": "[mismatch]"}]
    assert got[0].source is got[1].source  # one dict per connection, as inline
    row = json.loads(data.splitlines()[1])["flows"][0]
    decoder = FlowDecoder()
    decoder.peers([row[1], src, dst])
    for bad in (row[:5], [*row[:7], 7, *row[8:]], [*row[:12], [1]]):
        with pytest.raises(ValueError):
            decoder.http(bad)
