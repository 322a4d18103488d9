"""HTTP/2 numbers of issue 5: h2c prior-knowledge GETs with h2load -c4 -m10, side by side.

nginx serves h2c on its own port (`listen ... http2`); Envoy speaks HTTP/2 on its listener and to
the cluster; HAProxy binds and connects with `proto h2`; the gateway runs `--protocol http2`. Every
proxy has the rule "GET /public/.*, else 403" and is checked for it before the load.
"""

from __future__ import annotations

import pytest

from tests.bench import harness, peers
from tests.bench.harness import DIRECT, ENVOY, Row, ScenarioResult, Target
from tests.bench.peers import PUBLIC_GET, Endpoint, PeerSet

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]

ALLOWED = "/public/index.html"
DENIED = "/private/x"
CLIENTS, STREAMS = 4, 10


def test_h2c_get(nginx, workdir, rounds, round_seconds, record):
    backend = Endpoint(DIRECT, nginx.h2_port, nginx.proc)

    def measure(ep: Endpoint) -> Row:
        peers.check_rule(ep, ALLOWED, DENIED, http2=True, direct=ep.peer == DIRECT)
        res = peers.run_h2load(
            ep.url_base + ALLOWED, round_seconds, workdir, clients=CLIENTS, streams=STREAMS
        )
        if res.errored or res.status_4xx or res.status_5xx or not res.status_2xx:
            raise peers.PeerError(
                f"{res.status_2xx} 2xx, {res.status_4xx} 4xx, {res.status_5xx} 5xx, "
                f"{res.errored} errored"
            )
        return Row(ep.peer, res.req_s, res.p50_ms, res.p99_ms, ep.proc.rss_mib())

    with PeerSet(workdir, backend, [PUBLIC_GET], http2=True) as peer_set:
        rows, failures = harness.measure_rows(peer_set.endpoints, measure, rounds)
    result = ScenarioResult(
        "HTTP/2 GET",
        f"h2load -c{CLIENTS} -m{STREAMS} -D{round_seconds:g} --warm-up-time=1 h2c prior knowledge "
        f"GET {ALLOWED}, rule GET /public/.*, HTTP/2 to nginx; {rounds} rounds, peers in turn, "
        "median shown",
        harness.REQ_S,
        rows,
        targets=(Target(ENVOY, 1.0),),
    )
    record(result)
    assert not failures, "; ".join(failures)
