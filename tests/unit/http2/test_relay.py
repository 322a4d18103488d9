"""The HTTP/2 relay between a real h2 client and a real h2 server, all in memory."""

from __future__ import annotations

import h2.events

from parsers.http2 import Decision, H2Limits, RequestReceived, StreamEnded
from parsers.http2 import frames as f

from .harness import Triangle, deny_path


def test_allowed_request_reaches_server_and_response_comes_back():
    t = Triangle()
    sid = t.request("/public/a?x=1")
    t.pump()
    got = t.responses()[sid]
    assert got["status"] == "200"
    assert got["body"] == b"hello /public/a?x=1"
    assert ("x-upstream", "yes") in got["headers"]
    assert got["ended"]
    requests = [e for e in t.server_events if isinstance(e, h2.events.RequestReceived)]
    assert requests[0].stream_id == sid  # client stream IDs are kept end to end
    assert (":path", "/public/a?x=1") in requests[0].headers
    assert any(isinstance(e, RequestReceived) and e.decision.allowed for e in t.relay_events)
    assert t.server.encoder.header_table_size == 0  # response blocks are stateless by default


def test_denied_request_gets_403_and_never_reaches_server():
    t = Triangle(deny_path("/private"))
    ok = t.request("/public/x")
    denied = t.request("/private/x")
    ok2 = t.request("/public/y")
    t.pump()
    got = t.responses()
    assert got[denied]["status"] == "403"
    assert got[denied]["body"] == b"Access denied\r\n"
    assert got[ok]["status"] == "200" and got[ok2]["status"] == "200"
    server_paths = [
        dict(e.headers)[":path"]
        for e in t.server_events
        if isinstance(e, h2.events.RequestReceived)
    ]
    assert server_paths == ["/public/x", "/public/y"]


def test_denied_grpc_call_gets_trailers_only_permission_denied():
    t = Triangle(deny_path("/pkg.Svc/Secret"))
    sid = t.request(
        "/pkg.Svc/Secret",
        "POST",
        [("content-type", "application/grpc+proto"), ("te", "trailers")],
        end_stream=False,
    )
    t.client.send_data(sid, b"\x00\x00\x00\x00\x02hi", end_stream=True)
    t.pump()
    got = t.responses()[sid]
    headers = dict(got["headers"])
    assert headers[":status"] == "200"
    assert headers["content-type"] == "application/grpc"
    assert headers["grpc-status"] == "7"
    assert headers["grpc-message"] == "Access denied"
    assert got["ended"] and got["body"] == b""
    assert not [e for e in t.server_events if isinstance(e, h2.events.RequestReceived)]


def test_denied_stream_body_is_credited_back_to_the_client():
    t = Triangle(deny_path("/private"))
    sid = t.request("/private/upload", "POST", end_stream=False)
    t.pump()
    before = t.client.outbound_flow_control_window
    # the stream was answered and reset with NO_ERROR; data already in flight is dropped
    assert t.responses()[sid]["status"] == "403"
    ok = t.request("/public/upload", "POST", end_stream=False)
    for _ in range(3):
        t.client.send_data(ok, b"x" * 15000)
    t.client.end_stream(ok)
    t.pump()
    assert t.responses()[ok]["status"] == "200"
    assert t.client.outbound_flow_control_window == before  # the server acknowledged it all


def test_dropped_data_on_denied_stream_returns_connection_window():
    t = Triangle(deny_path("/private"))
    sid = t.request("/private/upload", "POST", end_stream=False)
    # send body before the relay's answer arrives: DATA is in flight when the 403 comes back
    t.client.send_data(sid, b"y" * 10000)
    t.client.send_data(sid, b"y" * 10000)
    window = t.client.outbound_flow_control_window
    t.pump()
    assert t.client.outbound_flow_control_window == window + 20000


def test_server_reset_and_trailers_propagate():
    t = Triangle()
    t.auto_respond = False
    a = t.request("/a")
    b = t.request("/b", "POST", end_stream=False)
    t.client.send_data(b, b"body")
    t.client.send_headers(b, [("x-trailer", "1")], end_stream=True)
    t.pump()
    trailers = [e for e in t.server_events if isinstance(e, h2.events.TrailersReceived)]
    assert trailers and (b"x-trailer", b"1") in [
        (n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v)
        for n, v in trailers[0].headers
    ]
    t.server.reset_stream(a, 0x8)
    t.server.send_headers(b, [(":status", "200")])
    t.server.send_headers(b, [("grpc-status", "5")], end_stream=True)
    t.pump()
    got = t.responses()
    assert got[a]["reset"] == 0x8
    assert dict(got[b]["trailers"])["grpc-status"] == "5"
    ended = [e for e in t.relay_events if isinstance(e, StreamEnded)]
    assert any(e.stream_id == b and e.grpc_status == "5" for e in ended)
    assert any(e.stream_id == a and e.reset_by == "server" for e in ended)


def test_client_reset_reaches_server():
    t = Triangle()
    t.auto_respond = False
    sid = t.request("/slow")
    t.pump()
    t.client.reset_stream(sid, 0x8)
    t.pump()
    resets = [e for e in t.server_events if isinstance(e, h2.events.StreamReset)]
    assert resets and resets[0].stream_id == sid and resets[0].error_code == 0x8
    assert t.relay.active_streams == 0


def test_repeated_requests_hit_the_block_cache_and_stay_correct():
    calls = []

    def decide(request):
        calls.append(request.path)
        return Decision(not request.path.startswith("/private"))

    t = Triangle(decide)
    for _ in range(5):
        t.request("/same")
        t.request("/private/same")
        t.pump()
    got = t.responses()
    statuses = [got[s]["status"] for s in sorted(got)]
    assert statuses == ["200", "403"] * 5
    assert calls.count("/same") < 5  # decided once the block became an indexed-only block


def test_header_edit_from_policy_is_forwarded():
    def decide(request):
        return Decision(True, headers=(*request.headers, ("x-added", "1")))

    t = Triangle(decide)
    t.request("/p")
    t.pump()
    req = [e for e in t.server_events if isinstance(e, h2.events.RequestReceived)][0]
    assert ("x-added", "1") in req.headers


def test_settings_are_relayed_and_capped():
    t = Triangle(limits=H2Limits(max_concurrent_streams=7))
    t.server.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
    t.pump()
    assert t.client.remote_settings.max_concurrent_streams == 7
    # the server acknowledged the client's SETTINGS through the relay
    assert any(isinstance(e, h2.events.SettingsAcknowledged) for e in t.client_events)
    assert t.server.remote_settings.enable_push == 0


def test_too_many_streams_are_refused():
    t = Triangle(limits=H2Limits(max_concurrent_streams=2))
    t.auto_respond = False
    t.pump()
    t.client.remote_settings.update({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 10})
    t.client.remote_settings.acknowledge()
    sids = [t.request(f"/s{i}") for i in range(3)]
    t.pump()
    assert t.responses()[sids[2]]["reset"] == f.REFUSED_STREAM


def test_response_compression_can_be_kept_at_a_cpu_cost():
    t = Triangle(limits=H2Limits(response_header_table_size=4096))
    for i in range(3):
        t.request(f"/p{i}")
        t.pump()
    got = t.responses()
    assert [got[s]["status"] for s in sorted(got)] == ["200"] * 3
    assert t.server.encoder.header_table_size == 4096  # the server kept its dynamic table
    ended = [e for e in t.relay_events if isinstance(e, StreamEnded)]
    assert [e.status for e in ended] == [200, 200, 200]


def test_real_rule_set_with_header_mismatch_actions():
    from types import SimpleNamespace

    from l7proxy.http2.policy import H2Policy
    from policies import HttpRuleSet
    from policies.model import HeaderMatch, HttpRule

    rules = HttpRuleSet(
        [
            HttpRule(
                method="GET",
                path="/public/.*",
                headers=(
                    HeaderMatch("x-team", "blue", mismatch="ADD"),
                    HeaderMatch("x-debug", "0", mismatch="DELETE"),
                ),
            )
        ]
    )
    policy = H2Policy(SimpleNamespace(rules=lambda: rules))
    t = Triangle(policy.decide)
    ok = t.request("/public/a", extra=[("x-debug", "1")])
    denied = t.request("/other")
    t.pump()
    got = t.responses()
    assert got[ok]["status"] == "200" and got[denied]["status"] == "403"
    forwarded = [e for e in t.server_events if isinstance(e, h2.events.RequestReceived)]
    headers = dict(forwarded[0].headers)
    assert headers["x-team"] == "blue"
    assert "x-debug" not in headers
