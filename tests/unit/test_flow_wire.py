"""The proxy worker's compact flows (l7proxy/agent/flow_wire.py): what the agent rebuilds is
what the worker's sessions emitted, in order, key for key."""

from __future__ import annotations

import contextlib
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
    """Each line to the handler; a line it refuses is dropped, as the agent's API server does."""
    for line in data.splitlines():
        with contextlib.suppress(ValueError):
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


def http_flows(a: ConnContext, urls: list[str], verdict: str = "FORWARDED") -> list:
    from l7proxy.flows import HttpFlow

    src, dst = a.peers()
    return [
        HttpFlow(src, dst, 5555, 80, "INGRESS", verdict, b"GET", url.encode(), b"1.1",
                 200 if verdict == "FORWARDED" else 403, 1500 + n, (), 1_700_000_000_000_000_000 + n)
        for n, url in enumerate(urls)
    ]  # fmt: skip


def pending_side() -> tuple[WorkerHandle, list]:
    got: list = []
    agent = SimpleNamespace(flows=SimpleNamespace(ingest=got.append, ingest_pending=got.append))
    return WorkerHandle(agent, pid=0, port=0, reused=False), got


def kinds(data: bytes) -> list[str]:
    return [next(iter(json.loads(line))) for line in data.splitlines()]


def test_http_flows_go_as_shapes_and_numbers_and_come_back_unbuilt_equal_to_the_workers():
    """An HTTP/1 flow not built (HttpFlow) crosses as its shape (sent once) and four numbers:
    the agent gets an HttpFlow again (the first of its connection marked, to be built at once),
    whose dict is the one the worker would have built."""
    from l7proxy.flows import HttpFlow

    a = ctx(5555)
    src, dst = a.peers()
    sent = [
        HttpFlow(src, dst, 5555, 80, "INGRESS", "FORWARDED", b"GET", b"/public/a", b"1.1",
                 200, 1500, (), 1_700_000_000_123_456_789),
        HttpFlow(src, dst, 5555, 80, "INGRESS", "DROPPED", b"GET", b"/private/x", b"1.1",
                 403, 900, ("X-Token",), 1_700_000_001_000_000_000),
        HttpFlow(src, dst, 5555, 80, "INGRESS", "FORWARDED", b"GET", b"/public/a", b"1.1",
                 200, 1700, (), 1_700_000_000_999_000_000),  # earlier than the one before
    ]  # fmt: skip
    uplink = Uplink()
    for flow in sent:
        uplink.ingest_pending(flow)
    data = uplink.encode(uplink.take(), FlowEncoder())
    assert kinds(data) == ["peers", "shapes", "http"]
    assert len(json.loads(data.splitlines()[1])["shapes"]) == 2  # the third repeats the first
    assert len(json.loads(data.splitlines()[2])["http"]) == 1 + 4 * 3
    handle, got = pending_side()
    deliver(handle, data, {})
    assert [type(f) for f in got] == [HttpFlow] * 3 and [f.first for f in got] == [
        True,
        False,
        False,
    ]
    assert [f.flow() for f in got] == json.loads(json.dumps([f.flow() for f in sent]))
    assert got[1].flow()["l7"]["http"]["headers"] == [{"key": "X-Token", "value": "[mismatch]"}]
    assert got[0].source is got[1].source is got[2].source  # one dict per connection, as inline


def test_shapes_are_sent_once_per_channel_connection_and_flows_keep_their_order():
    a, b = ctx(5555), ctx(6666)
    uplink = Uplink()
    connection = FlowEncoder()
    for flow in http_flows(a, ["/a", "/b"]):
        uplink.ingest_pending(flow)
    first = uplink.encode(uplink.take(), connection)
    uplink.ingest_pending(http_flows(a, ["/b"])[0])
    uplink.ingest(b.flow("FORWARDED", HTTP, "not http/1"))  # a dict between HTTP flows
    uplink.ingest_pending(http_flows(a, ["/c"])[0])
    second = uplink.encode(uplink.take(), connection)
    assert kinds(first) == ["peers", "shapes", "http"]
    assert kinds(second) == ["http", "peers", "flows", "shapes", "http"]
    args: dict = {}
    handle, got = pending_side()
    deliver(handle, first + second, args)
    urls = [f.flow()["l7"]["http"]["url"] if type(f) is not dict else "dict" for f in got]
    assert urls == ["/a", "/b", "/b", "dict", "/c"]
    # The next agent connection gets its shapes and peers again; without them, nothing.
    uplink.ingest_pending(http_flows(a, ["/a"])[0])
    again = uplink.encode(uplink.take(), FlowEncoder())
    assert kinds(again) == ["peers", "shapes", "http"]
    handle, lost = pending_side()
    deliver(handle, second, {})
    assert [type(f) for f in lost] == [dict]  # only the dict flow, whose peers came with it


def test_many_shapes_start_fresh_tables_without_confusing_the_agent(monkeypatch):
    """URLs that never repeat: the worker's shape table starts afresh every MAX_SHAPES, ids keep
    growing, and the agent (keeping twice as many) names every flow right."""
    from l7proxy.agent import flow_wire

    monkeypatch.setattr(flow_wire, "MAX_SHAPES", 3)
    monkeypatch.setattr(proxy_worker_process, "FLOWS_PER_LINE", 4)
    a = ctx(5555)
    urls = [f"/item/{n % 11}" for n in range(40)]
    uplink = Uplink()
    connection = FlowEncoder()
    handle, got = pending_side()
    args: dict = {}
    for start in range(0, 40, 5):
        for flow in http_flows(a, urls[start : start + 5]):
            uplink.ingest_pending(flow)
        deliver(handle, uplink.encode(uplink.take(), connection), args)
    assert [f.flow()["l7"]["http"]["url"] for f in got] == urls
    assert [f.time_ns for f in got] == [1_700_000_000_000_000_000 + n % 5 for n in range(40)]


def test_http_lines_that_do_not_fit_are_refused():
    a = ctx(5555)
    uplink = Uplink()
    uplink.ingest_pending(http_flows(a, ["/a"])[0])
    peers, shapes, http = (
        json.loads(line) for line in uplink.encode(uplink.take(), FlowEncoder()).splitlines()
    )
    decoder = FlowDecoder()
    with pytest.raises(ValueError):
        decoder.shapes(shapes["shapes"])  # its peers never came
    decoder.peers(peers["peers"])
    shape = shapes["shapes"][0]
    for bad in ([shape[:9]], [[*shape[:4], "80", *shape[5:]]], [[*shape[:9], [1]]]):
        with pytest.raises(ValueError):
            decoder.shapes(bad)
    decoder.shapes(shapes["shapes"])
    run = http["http"]
    assert len(list(decoder.http_run(run))) == 1
    for bad in ([], run[:4], [run[0], 99, *run[2:]], [*run[:3], "5555", run[4]], ["0", *run[1:]]):
        with pytest.raises(ValueError):
            list(decoder.http_run(bad))


def test_http_rows_of_a_worker_from_before_shapes_still_decode():
    """A worker started before the shaped form (it keeps running across an agent upgrade) sends
    each HTTP/1 flow as an "http" row of all its fields in a `flows` line."""
    from l7proxy.flows import HttpFlow

    a = ctx(5555)
    src, dst = a.peers()
    (flow,) = http_flows(a, ["/public/a"])
    row = ["http", 7, flow.time_ns, "FORWARDED", "INGRESS", 5555, 80, "GET", "/public/a", "1.1",
           200, flow.latency, []]  # fmt: skip
    handle, got = pending_side()
    args: dict = {}
    handle.uplink(args, json.loads(json.dumps({"peers": [7, src, dst]})))
    handle.uplink(args, {"flows": [row]})
    assert [type(f) for f in got] == [HttpFlow] and got[0].first
    assert got[0].flow() == json.loads(json.dumps(flow.flow()))
    decoder = FlowDecoder()
    decoder.peers([7, src, dst])
    for bad in (row[:5], [*row[:7], 7, *row[8:]], [*row[:12], [1]]):
        with pytest.raises(ValueError):
            decoder.http(bad)
