"""The benchmark harness without processes: output parsers, ratios, targets, tables, configs."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tests.bench import harness, peers
from tests.bench.harness import DIRECT, ENVOY, HAPROXY, PROJECT, Row, ScenarioResult, Target

WRK_OUT = """Running 10s test @ http://127.0.0.1:52745/public/index.html
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.99ms  328.83us   6.25ms   65.98%
    Req/Sec    25.15k   669.16    25.75k    95.00%
  Latency Distribution
     50%  812.00us
     75%    2.21ms
     90%    2.37ms
     99%    1.02s
  250031 requests in 10.00s, 40.84MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 17
Requests/sec:  25002.85
Transfer/sec:     20.41MB
"""

H2LOAD_OUT = """starting benchmark...
Application protocol: h2c
finished in 3.00s, 76277.50 req/s, 54.49MB/s
requests: 152555 total, 152555 started, 152555 done, 152550 succeeded, 5 failed, 2 errored, 0 timeout
status codes: 152550 2xx, 0 3xx, 4 4xx, 1 5xx
traffic: 108.97MB (114263695) total, 24.30MB (25481488) headers (space savings 34.46%)
"""


def test_parse_wrk_reads_rate_percentiles_errors_and_units():
    res = peers.parse_wrk(WRK_OUT)
    assert res.req_s == pytest.approx(25002.85)
    assert res.requests == 250031
    assert res.p50_ms == pytest.approx(0.812)
    assert res.p99_ms == pytest.approx(1020.0)
    assert res.non_2xx == 17
    assert res.socket_errors == 6


def test_parse_wrk_clean_run_has_no_errors():
    text = WRK_OUT.replace("  Socket errors: connect 0, read 3, write 1, timeout 2\n", "")
    text = text.replace("  Non-2xx or 3xx responses: 17\n", "")
    res = peers.parse_wrk(text)
    assert (res.non_2xx, res.socket_errors) == (0, 0)


def test_parse_wrk_without_result_raises():
    with pytest.raises(ValueError, match="no wrk result"):
        peers.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_parse_h2load_summary():
    res = peers.parse_h2load(H2LOAD_OUT)
    assert res.req_s == pytest.approx(76277.5)
    assert (res.succeeded, res.failed, res.errored) == (152550, 5, 2)
    assert (res.status_2xx, res.status_4xx, res.status_5xx) == (152550, 4, 1)
    assert res.p50_ms is None


def test_parse_h2load_without_result_raises():
    with pytest.raises(ValueError, match="no h2load result"):
        peers.parse_h2load("connect error\nNo protocol negotiated\n")


def test_parse_h2load_log_percentiles_in_ms():
    lines = [f"1795699170776781\t200\t{us}" for us in range(1000, 101000, 1000)]  # 1..100 ms
    p50, p99 = peers.parse_h2load_log("\n".join(lines) + "\nnot a record\n")
    assert (p50, p99) == (50.0, 99.0)
    assert peers.parse_h2load_log("") == (None, None)


def test_percentile_nearest_rank():
    values = [float(v) for v in range(1, 11)]
    assert peers.percentile(values, 50) == 5.0
    assert peers.percentile(values, 99) == 10.0
    assert peers.percentile([7.0], 99) == 7.0
    assert peers.percentile([], 50) is None


def _result(project: Row, metric=harness.REQ_S, targets=()) -> ScenarioResult:
    rows = (
        project,
        Row(ENVOY, 25000.0, 2.0, 5.0, 64.0),
        Row(DIRECT, 150000.0, 0.3, 1.0, 19.0),
        Row(HAPROXY, 80000.0, 0.5, 1.2, 16.0),
    )
    return ScenarioResult("GET", "wrk", metric, harness.order_rows(rows), targets)


def test_ratios_are_project_over_peer():
    res = _result(Row(PROJECT, 60000.0, 0.8, 2.0, 32.0))
    assert [r.peer for r in res.rows] == [DIRECT, ENVOY, HAPROXY, PROJECT]
    assert res.ratio(ENVOY) == pytest.approx(2.4)
    assert res.ratio(HAPROXY) == pytest.approx(0.75)
    assert res.rss_ratio(ENVOY) == pytest.approx(0.5)
    assert res.ratio(PROJECT) is None


def test_targets_follow_the_metric_direction():
    throughput = _result(Row(PROJECT, 60000.0), targets=(Target(ENVOY, 2.0), Target(HAPROXY, 0.8)))
    assert [throughput.target_status(t) for t in throughput.targets] == ["met", "not met"]
    assert "got 2.40x" in throughput.describe_target(throughput.targets[0])
    latency = _result(
        Row(PROJECT, 20000.0), metric=harness.ADDED_P99, targets=(Target(ENVOY, 1.0),)
    )
    assert latency.target_status(latency.targets[0]) == "met"


def test_unavailable_project_has_no_number_and_unknown_targets():
    res = _result(harness.not_available(PROJECT, "no gateway yet"), targets=(Target(ENVOY, 2.0),))
    assert res.ratio(ENVOY) is None
    assert res.target_status(res.targets[0]) == "unknown"
    text = harness.render_text([res])
    assert "not available: no gateway yet" in text
    assert "150,000" in text and "25,000" in text  # the peers' rows print regardless


def test_markdown_and_json_hold_every_row_and_ratio(tmp_path):
    res = _result(Row(PROJECT, 50000.0, 1.0, 3.0, 40.0), targets=(Target(ENVOY, 2.0),))
    md = harness.render_markdown([res])
    assert md.count("\n| GET |") == 4
    assert "| 2.00x |" in md
    json_path, md_path = harness.write_results([res], tmp_path, meta={"time": "t"})
    doc = json.loads(json_path.read_text())
    scenario = doc["scenarios"][0]
    assert scenario["ratios"][ENVOY] == pytest.approx(2.0)
    assert scenario["targets"][0]["status"] == "met"
    assert {r["peer"] for r in scenario["rows"]} == {DIRECT, ENVOY, HAPROXY, PROJECT}
    assert (tmp_path / "latest.json").read_text() == json_path.read_text()
    assert (tmp_path / "latest.md").read_text() == md_path.read_text()


@dataclass
class _Endpoint:
    peer: str
    unavailable: str | None = None


def test_measure_rows_records_unavailable_and_failed_peers():
    def measure(ep):
        if ep.peer == HAPROXY:
            raise peers.PeerError("GET /private/x got 200, expected 403")
        return Row(ep.peer, 1.0)

    eps = [_Endpoint(PROJECT, "not built"), _Endpoint(HAPROXY), _Endpoint(ENVOY)]
    rows, failures = harness.measure_rows(eps, measure)
    assert [r.peer for r in rows] == [ENVOY, HAPROXY, PROJECT]
    assert rows[1].note.startswith("failed: GET /private/x") and rows[1].value is None
    assert rows[2].note == "not available: not built"
    assert failures == ["HAProxy: GET /private/x got 200, expected 403"]


def test_fmt_value():
    assert harness.fmt_value(None) == "-"
    assert harness.fmt_value(27100.4, "req/s") == "27,100"
    assert harness.fmt_value(0.4321) == "0.43"
    assert harness.fmt_value(64.25) == "64.2"


def test_haproxy_config_expresses_the_rule_and_h2():
    rules = [peers.PUBLIC_GET, peers.UPLOAD_POST]
    cfg = peers.haproxy_cfg(8080, 9090, rules, http2=True, nofile=20000)
    assert "nbthread 1" in cfg
    assert "acl is_get method GET" in cfg and "acl public_path path_reg ^/public/.*$" in cfg
    assert (
        "http-request deny deny_status 403 unless is_get public_path || is_post upload_path" in cfg
    )
    assert "bind 127.0.0.1:8080 proto h2" in cfg and "server nginx 127.0.0.1:9090 proto h2" in cfg
    assert f"maxconn {peers.haproxy_maxconn(20000)}" in cfg


def test_envoy_config_has_rbac_allow_and_h2_both_sides():
    conf = peers.envoy_config(8080, 9090, [peers.PUBLIC_GET], http2=True)
    listener = conf["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    rbac = hcm["http_filters"][0]["typed_config"]["rules"]
    assert rbac["action"] == "ALLOW"
    rules = rbac["policies"]["bench"]["permissions"][0]["and_rules"]["rules"]
    assert rules[0]["header"] == {"name": ":method", "string_match": {"exact": "GET"}}
    assert rules[1]["url_path"]["path"]["safe_regex"]["regex"] == "/public/.*"
    assert "http2_protocol_options" in hcm
    cluster = conf["static_resources"]["clusters"][0]
    assert "typed_extension_protocol_options" in cluster
    plain = peers.envoy_config(8080, 9090, [peers.PUBLIC_GET], http2=False)
    assert "typed_extension_protocol_options" not in plain["static_resources"]["clusters"][0]


def test_cilium_policy_allows_the_rules_on_the_listener_port():
    pol = peers.cilium_policy(8080, [peers.PUBLIC_GET])
    assert pol["kind"] == "CiliumNetworkPolicy"
    assert pol["spec"]["endpointSelector"] == {"matchLabels": {"app": "web"}}
    ingress = pol["spec"]["ingress"][0]
    assert ingress["fromEntities"] == ["all"]
    port_rule = ingress["toPorts"][0]
    assert port_rule["ports"] == [{"port": "8080", "protocol": "TCP"}]
    assert port_rule["rules"]["http"] == [{"method": "GET", "path": "/public/.*"}]


def test_negative_latency_delta_meets_target_without_a_ratio():
    rows = (Row(ENVOY, 9.09), Row(PROJECT, -15.0), Row(DIRECT, 0.0))
    res = ScenarioResult("rate", "loadgen", harness.ADDED_P99, rows, (Target(ENVOY, 1.0),))
    assert res.ratio(ENVOY) is None and res.ratio(DIRECT) is None
    assert res.target_status(res.targets[0]) == "met"
    assert "(-15.0 vs 9.09 ms)" in res.describe_target(res.targets[0])
    worse = ScenarioResult(
        "rate", "loadgen", harness.ADDED_P99, (Row(ENVOY, 2.0), Row(PROJECT, 3.0))
    )
    assert worse.target_status(Target(ENVOY, 1.0)) == "not met"


def test_nginx_backend_config(tmp_path):
    conf = peers.nginx_conf(tmp_path, 8080, 8443, nofile=20000)
    assert "listen 127.0.0.1:8443 http2;" in conf  # h2c with prior knowledge
    assert "keepalive_requests 1000000;" in conf  # or h2load stalls at nginx's GOAWAY
    assert "proxy_pass_request_body off;" in conf  # the upload sink reads the whole body
    assert "add_trailer grpc-status 0 always;" in conf
    assert "worker_rlimit_nofile 20000;" in conf


def test_rounds_take_turns_and_report_the_median():
    calls = []

    def measure(ep):
        calls.append(ep.peer)
        value = {1: 10.0, 2: 30.0, 3: 20.0}[calls.count(ep.peer)]
        return Row(ep.peer, value, p50_ms=value / 10, p99_ms=value, rss_mib=float(len(calls)))

    rows, failures = harness.measure_rows([_Endpoint(ENVOY), _Endpoint(PROJECT)], measure, rounds=3)
    assert calls == [ENVOY, PROJECT] * 3  # in turn, not one peer's three rounds in a row
    envoy = rows[0]
    assert (envoy.value, envoy.p50_ms, envoy.p99_ms) == (20.0, 2.0, 20.0)
    assert envoy.rss_mib == 5.0  # the last round's
    assert envoy.note.startswith("median of 3 rounds (10.0 30.0 20.0)")
    assert failures == []


def test_the_project_failing_a_round_fails_and_is_not_measured_again():
    calls = []

    def measure(ep):
        calls.append(ep.peer)
        if ep.peer == PROJECT and calls.count(PROJECT) == 2:
            raise peers.PeerError("boom")
        return Row(ep.peer, 1.0)

    rows, failures = harness.measure_rows([_Endpoint(PROJECT), _Endpoint(ENVOY)], measure, 3)
    assert calls.count(PROJECT) == 2 and calls.count(ENVOY) == 3
    assert failures == ["l7proxy: boom"]
    assert next(r for r in rows if r.peer == PROJECT).note == "failed: boom"


def test_a_reference_peer_may_lose_a_minority_of_rounds_and_the_note_says_so():
    calls = []

    def measure(ep):
        calls.append(ep.peer)
        if ep.peer == HAPROXY and calls.count(HAPROXY) == 2:
            raise peers.PeerError("18 errored")
        return Row(ep.peer, float(calls.count(ep.peer)))

    rows, failures = harness.measure_rows([_Endpoint(HAPROXY), _Endpoint(ENVOY)], measure, 3)
    assert failures == []
    haproxy = next(r for r in rows if r.peer == HAPROXY)
    assert haproxy.value == 2.0  # the median of rounds 1 and 3
    assert "1 of 3 rounds failed (round 2: 18 errored)" in haproxy.note


def test_a_reference_peer_failing_half_its_rounds_fails_the_run():
    def measure(ep):
        if ep.peer == HAPROXY:
            raise peers.PeerError("boom")
        return Row(ep.peer, 1.0)

    rows, failures = harness.measure_rows([_Endpoint(HAPROXY), _Endpoint(ENVOY)], measure, 3)
    assert failures == ["HAProxy: boom"]
    assert next(r for r in rows if r.peer == HAPROXY).value is None
