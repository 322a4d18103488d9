import asyncio
import io
import json

import pytest

from l7proxy import protocols
from l7proxy.admin import AdminResponse, AdminServer, install_core_routes
from l7proxy.config import (
    GatewayConfig,
    HostPort,
    ListenerConfig,
    PeerConfig,
    ProxyConfig,
    load_yaml,
)
from l7proxy.context import ConnContext, OriginalDestination, StaticDestination
from l7proxy.flows import FlowSink, rfc3339_nano
from l7proxy.metrics import ProxyMetrics, Registry


def test_hostport_and_peer_parse():
    assert HostPort.parse("127.0.0.1:80") == HostPort("127.0.0.1", 80)
    assert HostPort.parse(":8080") == HostPort("0.0.0.0", 8080)
    assert HostPort.parse("[::1]:9") == HostPort("::1", 9)
    with pytest.raises(ValueError):
        HostPort.parse("nohost")
    assert PeerConfig.parse("10.0.0.0/8=app=x,team=y") == PeerConfig("10.0.0.0/8", "app=x,team=y")


def test_gateway_config_validate_and_yaml(tmp_path):
    cfg = tmp_path / "gw.yaml"
    cfg.write_text(
        "listeners:\n- {listen: '127.0.0.1:0', upstream: '127.0.0.1:80'}\n"
        "policy: p.yaml\nlabels: app=web\npeers: ['10.0.0.0/8=app=x']\n"
        "limits: {max_header_bytes: 1024, header_timeout: 2}\n"
    )
    kw = load_yaml(cfg)
    assert kw["listeners"][0].upstream == HostPort("127.0.0.1", 80)
    assert kw["policy_paths"] == ["p.yaml"]
    assert kw["limits"] == {"max_header_bytes": 1024, "header_timeout": 2}
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits: {nonsense: 1}\n")
    with pytest.raises(ValueError, match="nonsense"):
        load_yaml(bad)
    with pytest.raises(ValueError, match="protocol"):
        GatewayConfig(
            (ListenerConfig(HostPort("a", 1), HostPort("b", 2), "gopher"),), ("p",), "a=b"
        ).validate()
    assert ProxyConfig().replace(max_header_count=3).max_header_count == 3


def test_metrics_render_counter_gauge_histogram():
    m = ProxyMetrics()
    p = m.for_proto("http")
    p.received.inc()
    p.received.inc()
    p.denied.inc()
    p.active.inc()
    p.duration.observe(0.003)
    text = m.render()
    assert 'policy_l7_total{rule="received",proto="http"} 2' in text
    assert 'policy_l7_total{rule="denied",proto="http"} 1' in text
    assert 'l7proxy_active_connections{proto="http"} 1' in text
    assert 'l7proxy_request_duration_seconds_bucket{proto="http",le="0.005"} 1' in text
    assert 'l7proxy_request_duration_seconds_bucket{proto="http",le="0.001"} 0' in text
    assert 'l7proxy_request_duration_seconds_count{proto="http"} 1' in text
    r = Registry()
    r.counter("x", "help")
    with pytest.raises(ValueError):
        r.gauge("x", "help")


def test_flow_sink_writes_lines_and_fans_out():
    async def run():
        out = io.StringIO()
        sink = FlowSink(stream=out)
        q = sink.subscribe()
        sink.emit({"verdict": "FORWARDED"})
        await asyncio.sleep(0)
        assert json.loads(out.getvalue()) == {"verdict": "FORWARDED"}
        assert (await q.get())["verdict"] == "FORWARDED"
        sink.unsubscribe(q)
        assert sink.active
        assert not FlowSink().active

    asyncio.run(run())
    assert rfc3339_nano(1_500_000_000_123_456_789) == "2017-07-14T02:40:00.123456789Z"


def test_conn_context_flow_shape():
    ctx = ConnContext(
        config=ProxyConfig(),
        client=("10.0.0.5", 40000),
        listener_port=8080,
        destination=StaticDestination("127.0.0.1", 80)(None),
        source_identity=2,
        source_labels=("reserved:world",),
        destination_identity=1234,
        destination_labels=("k8s:app=web",),
        rules=lambda: None,
        flows=FlowSink(),
        metrics=ProxyMetrics(),
    )
    assert ctx.destination == OriginalDestination("127.0.0.1", 80)
    flow = ctx.flow("DROPPED", None, "TCP", drop_reason="POLICY_DENIED", event_type="L3_L4")
    assert flow["source"] == {"identity": 2, "labels": ["reserved:world"], "ip": "10.0.0.5"}
    assert flow["l4"] == {"TCP": {"source_port": 40000, "destination_port": 8080}}
    assert flow["drop_reason_desc"] == "POLICY_DENIED" and flow["event_type"] == "L3_L4"


def test_sniff():
    assert protocols.sniff(b"GET / HTTP/1.1\r\n") == "http"
    assert protocols.sniff(b"GE") is None
    assert protocols.sniff(protocols.H2_PREFACE) == "http2"
    assert protocols.sniff(b"PRI * HTTP/2") is None
    kafka = (20).to_bytes(4, "big") + (3).to_bytes(2, "big") + (9).to_bytes(2, "big") + b"\0" * 4
    assert protocols.sniff(kafka) == "kafka"
    assert protocols.sniff(kafka[:5]) is None
    with pytest.raises(ValueError):
        protocols.sniff(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")  # TLS ClientHello


def test_protocol_registry():
    protocols.register("echo-test", lambda ctx, first: ("session", first))
    assert protocols.make_session("echo-test", None, b"x") == ("session", b"x")
    with pytest.raises(LookupError):
        protocols.factory_for("gopher")
    assert {"http", "http2", "kafka"} <= set(protocols.available())


async def _get(port, path):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    return data


def test_admin_routes_and_streaming():
    async def run():
        admin = AdminServer()
        metrics = ProxyMetrics()
        metrics.for_proto("http").forwarded.inc()
        install_core_routes(admin, metrics, lambda: {"revision": 3, "files": ["p.yaml"]})

        async def events(request):
            async def gen():
                for i in range(3):
                    yield f"data: {i}\n\n".encode()

            return AdminResponse(content_type="text/event-stream", stream=gen())

        async def broken(request):
            raise RuntimeError("boom")

        admin.add_route("/map/events", events)
        admin.add_route("/broken", broken)
        _, port = await admin.start("127.0.0.1", 0)
        try:
            assert (await _get(port, "/healthz")).endswith(b"\r\n\r\nok\n")
            body = await _get(port, "/metrics")
            assert b'policy_l7_total{rule="forwarded",proto="http"} 1' in body
            pol = await _get(port, "/policy?x=1")
            assert json.loads(pol.split(b"\r\n\r\n", 1)[1]) == {"revision": 3, "files": ["p.yaml"]}
            sse = await _get(port, "/map/events")
            assert b"text/event-stream" in sse and sse.endswith(
                b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            )
            assert (await _get(port, "/nope")).startswith(b"HTTP/1.1 404")
            assert (await _get(port, "/broken")).startswith(b"HTTP/1.1 500")
        finally:
            await admin.close()

    asyncio.run(run())


def test_merge_expositions_sums_samples_and_keeps_families_grouped():
    from l7proxy.metrics import merge_expositions

    a, b = ProxyMetrics(), ProxyMetrics()
    a.for_proto("http").received.inc(3)
    a.for_proto("http").duration.observe(0.002)
    a.policy_revision.set(4)
    b.for_proto("http").received.inc(2)
    b.for_proto("http").denied.inc()  # only in the second worker
    b.for_proto("http").duration.observe(0.002)
    b.policy_revision.set(4)
    merged = merge_expositions([a.render(), b.render()])
    lines = merged.splitlines()
    assert 'policy_l7_total{rule="received",proto="http"} 5' in lines
    assert 'policy_l7_total{rule="denied",proto="http"} 1' in lines
    assert 'l7proxy_request_duration_seconds_count{proto="http"} 2' in lines
    assert "l7proxy_policy_revision 4" in lines
    # the denied sample sits with its family, before the next family's TYPE line
    denied = lines.index('policy_l7_total{rule="denied",proto="http"} 1')
    next_type = next(i for i, ln in enumerate(lines) if ln.startswith("# TYPE l7proxy_request"))
    assert lines.index("# TYPE policy_l7_total counter") < denied < next_type
