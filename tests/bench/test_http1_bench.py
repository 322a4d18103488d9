"""HTTP/1.1 numbers of issue 4, side by side: direct nginx, Envoy, HAProxy and the project.

Every proxy runs one worker with the rule "GET /public/.*, else 403" (the upload scenario also
allows POST /upload/.*; the download scenario fetches a 1 MiB static file under /public/). Each
scenario starts its proxies fresh, checks that each enforces the rule, then measures them one
after another.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from tests.bench import harness, peers
from tests.bench.harness import DIRECT, ENVOY, HAPROXY, Row, ScenarioResult, Target
from tests.bench.peers import PUBLIC_GET, UPLOAD_POST, Endpoint, PeerSet

pytestmark = [pytest.mark.bench, pytest.mark.timeout(900)]

ALLOWED = "/public/index.html"
DENIED = "/private/x"
CONNECTIONS = 50
UPLOAD_CONNECTIONS = 8
FIXED_RATE = 1000
RATE_ROUNDS = 5
MIB = 1024 * 1024


@pytest.fixture
def backend(nginx) -> Endpoint:
    return Endpoint(DIRECT, nginx.http_port, nginx.proc)


def _checked(endpoint: Endpoint) -> None:
    peers.check_rule(endpoint, ALLOWED, DENIED, direct=endpoint.peer == DIRECT)


def _wrk(endpoint: Endpoint, path: str, seconds: float, warmed: set, **kw) -> peers.WrkResult:
    url = endpoint.url_base + path
    if endpoint.peer not in warmed:
        peers.run_wrk(url, 1, **kw)  # warm-up: connections, caches, the allocator
        warmed.add(endpoint.peer)
    return peers.run_wrk(url, seconds, **kw)


def _turns(rounds: int, seconds: float) -> str:
    return f"{rounds} rounds of {seconds:g}s per peer, peers in turn, median shown"


def _finish(record, result: ScenarioResult, failures: list[str]) -> None:
    record(result)
    assert not failures, "; ".join(failures)


def test_keepalive_get(backend, workdir, rounds, round_seconds, record):
    warmed: set[str] = set()

    def measure(ep: Endpoint) -> Row:
        _checked(ep)
        res = _wrk(ep, ALLOWED, round_seconds, warmed, connections=CONNECTIONS)
        if res.non_2xx or res.socket_errors:
            raise peers.PeerError(f"{res.non_2xx} non-2xx, {res.socket_errors} socket errors")
        return Row(ep.peer, res.req_s, res.p50_ms, res.p99_ms, ep.proc.rss_mib())

    with PeerSet(workdir, backend, [PUBLIC_GET], http2=False) as peer_set:
        rows, failures = harness.measure_rows(peer_set.endpoints, measure, rounds)
    result = ScenarioResult(
        "HTTP/1.1 GET",
        f"wrk -t1 -c{CONNECTIONS} keep-alive GET {ALLOWED}, rule GET /public/.*; "
        f"{_turns(rounds, round_seconds)}",
        harness.REQ_S,
        rows,
        targets=(Target(ENVOY, 2.0), Target(HAPROXY, 0.8)),
    )
    _finish(record, result, failures)


def test_deny_path(backend, workdir, rounds, round_seconds, record):
    warmed: set[str] = set()

    def measure(ep: Endpoint) -> Row:
        _checked(ep)
        res = _wrk(ep, DENIED, round_seconds, warmed, connections=CONNECTIONS)
        if res.requests == 0 or res.non_2xx < res.requests:
            raise peers.PeerError(f"only {res.non_2xx} of {res.requests} answers were denials")
        note = "404s: nginx has no policy (reference)" if ep.peer == DIRECT else ""
        return Row(ep.peer, res.req_s, res.p50_ms, res.p99_ms, ep.proc.rss_mib(), note)

    with PeerSet(workdir, backend, [PUBLIC_GET], http2=False) as peer_set:
        rows, failures = harness.measure_rows(peer_set.endpoints, measure, rounds)
    result = ScenarioResult(
        "HTTP/1.1 deny",
        f"wrk -t1 -c{CONNECTIONS} keep-alive GET {DENIED} (403 from each proxy); "
        f"{_turns(rounds, round_seconds)}",
        harness.DENIED_S,
        rows,
    )
    _finish(record, result, failures)


def test_upload_1mib(backend, workdir, rounds, round_seconds, record):
    warmed: set[str] = set()

    script = workdir / "upload.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("u", {MIB})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )

    def measure(ep: Endpoint) -> Row:
        _checked(ep)
        status = peers.curl_status(ep.url_base + "/upload/probe", "POST", data="probe")
        if status != 200:
            raise peers.PeerError(f"POST /upload/probe got {status or 'no answer'}, expected 200")
        res = _wrk(
            ep, "/upload/blob", round_seconds, warmed, connections=UPLOAD_CONNECTIONS, script=script
        )
        if res.non_2xx or res.socket_errors or res.requests == 0:
            raise peers.PeerError(f"{res.non_2xx} non-2xx, {res.socket_errors} socket errors")
        return Row(ep.peer, res.req_s, res.p50_ms, res.p99_ms, ep.proc.rss_mib())

    with PeerSet(workdir, backend, [PUBLIC_GET, UPLOAD_POST], http2=False) as peer_set:
        rows, failures = harness.measure_rows(peer_set.endpoints, measure, rounds)
    result = ScenarioResult(
        "HTTP/1.1 1 MiB upload",
        f"wrk -t1 -c{UPLOAD_CONNECTIONS} POST /upload/blob with a 1 MiB body; nginx reads the "
        f"whole body before it answers; MiB/s = requests/s; {_turns(rounds, round_seconds)}",
        harness.MIB_S,
        rows,
    )
    _finish(record, result, failures)


DOWNLOAD = "/public/blob-1m.bin"
DOWNLOAD_MIB_S = harness.Metric("download", "MiB/s", True)


def test_download_1mib(nginx, backend, workdir, rounds, round_seconds, record):
    """The response direction of the upload row: a 1 MiB static file, Content-Length framed."""
    warmed: set[str] = set()
    (nginx.directory / "www" / "public" / "blob-1m.bin").write_bytes(b"d" * MIB)

    def measure(ep: Endpoint) -> Row:
        _checked(ep)
        res = _wrk(ep, DOWNLOAD, round_seconds, warmed, connections=UPLOAD_CONNECTIONS)
        if res.non_2xx or res.socket_errors or res.requests == 0:
            raise peers.PeerError(f"{res.non_2xx} non-2xx, {res.socket_errors} socket errors")
        return Row(ep.peer, res.req_s, res.p50_ms, res.p99_ms, ep.proc.rss_mib())

    with PeerSet(workdir, backend, [PUBLIC_GET], http2=False) as peer_set:
        rows, failures = harness.measure_rows(peer_set.endpoints, measure, rounds)
    result = ScenarioResult(
        "HTTP/1.1 1 MiB download",
        f"wrk -t1 -c{UPLOAD_CONNECTIONS} keep-alive GET {DOWNLOAD} (a 1 MiB static file, "
        f"Content-Length framed); MiB/s = requests/s; {_turns(rounds, round_seconds)}",
        DOWNLOAD_MIB_S,
        rows,
    )
    _finish(record, result, failures)


def _rate(ep: Endpoint, seconds: float) -> dict:
    res = peers.run_rate(ep.port, ALLOWED, FIXED_RATE, seconds)
    if res["errors"] or set(res["statuses"]) != {"200"}:
        raise peers.PeerError(f"statuses {res['statuses']}, errors {res['errors']}")
    if res["completed"] != res["sent"]:
        raise peers.PeerError(f"{res['completed']} of {res['sent']} requests completed")
    return res


def test_p99_added_at_fixed_rate(backend, workdir, duration, record):
    """Alternating short rounds, direct then proxy; the median round wins.

    On a shared machine one stall of another job moves a whole run's p99 by tens of ms; the median
    over rounds of (proxy p99 - direct p99 just before) keeps what the proxy itself adds.
    """
    seconds = float(max(2, round(duration / RATE_ROUNDS)))

    def measure(ep: Endpoint) -> Row:
        _checked(ep)
        runs, added = [], []
        for _ in range(RATE_ROUNDS):
            base = None if ep.peer == DIRECT else _rate(backend, seconds)["p99_ms"]
            runs.append(_rate(ep, seconds))
            added.append(0.0 if base is None else runs[-1]["p99_ms"] - base)
        p50 = statistics.median(r["p50_ms"] for r in runs)
        p99 = statistics.median(r["p99_ms"] for r in runs)
        # A stall (of the proxy, or of the whole shared machine) lowers the completed rate; it is
        # already in the latencies, which count from each request's due time.
        slowest = min(r["achieved_rate"] for r in runs)
        note = "rounds p99 " + " ".join(f"{r['p99_ms']:.2f}" for r in runs)
        note += f"; slowest round {slowest:.0f} req/s" if slowest < 0.95 * FIXED_RATE else ""
        return Row(ep.peer, statistics.median(added), p50, p99, ep.proc.rss_mib(), note)

    with PeerSet(workdir, backend, [PUBLIC_GET], http2=False) as peer_set:
        rows, failures = harness.measure_rows(peer_set.endpoints, measure)
    result = ScenarioResult(
        "HTTP/1.1 at 1,000 req/s",
        f"open-loop {FIXED_RATE} req/s over 16 keep-alive connections (tests/bench/loadgen.py, "
        f"latency from the due time), {RATE_ROUNDS} rounds of {seconds:g}s; value = median over "
        "rounds of (p99 - p99 of a direct round just before)",
        harness.ADDED_P99,
        rows,
        targets=(Target(ENVOY, 1.0),),
    )
    _finish(record, result, failures)


# fds a proxy needs besides one per idle client: listeners, logs, and the upstream connections
# of clients that are not parked yet while the connections open (the gateway gives an idle
# client's upstream connection back to its pool after `upstream_park_after`, as Envoy's pool does).
FD_HEADROOM = 4000


def idle_count(nofile: int) -> tuple[int, str]:
    """10,000 (or BENCH_IDLE_CONNS), capped to what one socket per connection leaves of the fd
    limit (raising the hard limit needs CAP_SYS_RESOURCE)."""
    wanted = int(os.environ.get("BENCH_IDLE_CONNS", "10000"))
    fits = nofile - FD_HEADROOM
    if wanted <= fits:
        return wanted, ""
    return fits, f"{wanted:,} wanted; the fd limit {nofile} fits {fits:,}"


def test_rss_idle_keepalive(backend, workdir, nofile, record):
    count, capped = idle_count(nofile)
    notes = [capped] if capped else []
    # HAProxy reserves two fds per connection whatever it does with them and will not start
    # with a maxconn the limit can't cover: it holds fewer connections, said in its row.
    haproxy_count = min(count, peers.haproxy_maxconn(nofile) - 50)

    def measure(ep: Endpoint) -> Row:
        n = haproxy_count if ep.peer == HAPROXY else count
        _checked(ep)
        before = ep.proc.rss_mib()
        with peers.IdleConnections(ep.port, ALLOWED, n) as idle:
            if idle.report["open"] < n:
                raise peers.PeerError(f"only {idle.report['open']} of {n} opened: {idle.report}")
            time.sleep(1.0)
            rss = ep.proc.rss_mib()
            closed = idle.closed_meanwhile()
        if closed:
            raise peers.PeerError(f"closed {closed} of {n} idle connections")
        per_conn = (rss - before) * 1024 / n
        note = f"{before:.1f} MiB before; {per_conn:.1f} KiB per connection"
        if n != count:
            note += f"; {n:,} connections (its maxconn under the fd limit {nofile})"
        return Row(ep.peer, rss, rss_mib=rss, note=note)

    with PeerSet(workdir, backend, [PUBLIC_GET], http2=False) as peer_set:
        rows, failures = harness.measure_rows(peer_set.endpoints, measure)
    result = ScenarioResult(
        f"HTTP/1.1 {count:,} idle",
        f"{count:,} keep-alive connections, one GET {ALLOWED} each, then idle; VmRSS of the "
        f"process tree (fd limit {nofile})",
        harness.IDLE_RSS,
        rows,
        targets=(Target(ENVOY, 1.0),),
        notes=tuple(notes),
    )
    _finish(record, result, failures)
