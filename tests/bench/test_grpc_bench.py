"""gRPC unary numbers of issue 5: h2load with a gRPC frame body, direct grpcio against the proxies.

The test proto (protos/l7bench.proto) is compiled at test time into a temp dir. Every proxy allows
only `POST /l7bench.Bench/Unary`; before the load a grpcio client checks that Unary passes and that
Private gets PERMISSION_DENIED through each proxy (and passes direct).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bench import harness, peers
from tests.bench.harness import DIRECT, DIRECT_GRPC, ENVOY, Row, ScenarioResult, Target
from tests.bench.peers import Endpoint, PeerSet, Proc, Rule

pytestmark = [pytest.mark.bench, pytest.mark.timeout(600)]

PROTOS = Path(__file__).with_name("protos")
SERVER = Path(__file__).with_name("grpc_server.py")
UNARY = "/l7bench.Bench/Unary"
RULE = Rule("unary", "POST", UNARY)
CLIENTS, STREAMS = 4, 10
PAYLOAD = b"l7proxy bench payload " * 3


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory) -> Path:
    """l7bench_pb2*.py compiled from the proto (generated code is never committed)."""
    out = tmp_path_factory.mktemp("grpc-gen")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTOS}", f"--python_out={out}"]
        + [f"--grpc_python_out={out}", str(PROTOS / "l7bench.proto")],
        check=True,
    )
    return out


@pytest.fixture(scope="module")
def stubs(gen_dir):
    sys.path.insert(0, str(gen_dir))
    try:
        yield importlib.import_module("l7bench_pb2"), importlib.import_module("l7bench_pb2_grpc")
    finally:
        sys.path.remove(str(gen_dir))


@pytest.fixture
def grpc_backend(gen_dir, workdir, nofile):
    port = peers.free_port()
    proc = Proc(DIRECT_GRPC, [sys.executable, str(SERVER), str(gen_dir), str(port)], workdir)
    proc.start()
    try:
        proc.wait_listening(port)
        yield Endpoint(DIRECT_GRPC, port, proc)
    finally:
        proc.stop()


def check_grpc(ep: Endpoint, stubs, direct: bool) -> None:
    """Unary must pass; Private must be denied by a proxy with PERMISSION_DENIED."""
    import grpc

    pb2, pb2_grpc = stubs
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{ep.port}", options=options) as channel:
        stub = pb2_grpc.BenchStub(channel)
        reply = stub.Unary(pb2.Payload(data=PAYLOAD), timeout=10)
        if reply.data != PAYLOAD:
            raise peers.PeerError("Unary did not echo the payload")
        try:
            stub.Private(pb2.Payload(data=PAYLOAD), timeout=10)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
    expected = grpc.StatusCode.OK if direct else grpc.StatusCode.PERMISSION_DENIED
    if code != expected:
        raise peers.PeerError(f"Private got {code.name}, expected {expected.name}")


def _frame(stubs) -> bytes:
    pb2, _ = stubs
    message = pb2.Payload(data=PAYLOAD).SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message  # one uncompressed gRPC frame


def _scenario(
    backend: Endpoint, stubs, workdir, rounds, seconds, name: str, notes: tuple[str, ...]
):
    body = workdir / "unary.grpc"
    body.write_bytes(_frame(stubs))
    headers = ("content-type: application/grpc", "te: trailers")

    def measure(ep: Endpoint) -> Row:
        direct = ep.peer == backend.peer
        check_grpc(ep, stubs, direct)
        res = peers.run_h2load(
            ep.url_base + UNARY,
            seconds,
            workdir,
            clients=CLIENTS,
            streams=STREAMS,
            headers=headers,
            data=body,
        )
        if res.errored or res.status_4xx or res.status_5xx or not res.status_2xx:
            raise peers.PeerError(
                f"{res.status_2xx} 2xx, {res.status_4xx} 4xx, {res.status_5xx} 5xx, "
                f"{res.errored} errored"
            )
        check_grpc(ep, stubs, direct)  # still healthy after the load
        return Row(ep.peer, res.req_s, res.p50_ms, res.p99_ms, ep.proc.rss_mib())

    with PeerSet(workdir, backend, [RULE], http2=True) as peer_set:
        rows, failures = harness.measure_rows(peer_set.endpoints, measure, rounds)
    return ScenarioResult(
        name,
        f"h2load -c{CLIENTS} -m{STREAMS} -D{seconds:g} POST {UNARY} with one gRPC frame "
        f"({len(body.read_bytes()) - 5} B message), te: trailers; rule POST {UNARY}; "
        f"{rounds} rounds, peers in turn, median shown",
        harness.REQ_S,
        rows,
        targets=(Target(ENVOY, 1.0),),
        notes=notes,
    ), failures


def test_grpc_unary_grpcio(grpc_backend, stubs, workdir, rounds, round_seconds, record):
    result, failures = _scenario(
        grpc_backend,
        stubs,
        workdir,
        rounds,
        round_seconds,
        "gRPC unary (grpcio)",
        (
            "backend: one grpc.aio echo process; it caps every row, compare the proxies at equal load",
        ),
    )
    record(result)
    assert not failures, "; ".join(failures)


def test_grpc_unary_nginx_reply(nginx, stubs, workdir, rounds, round_seconds, record):
    """The proxies' gRPC ceiling: nginx answers each call with a canned frame and trailers."""
    nginx.set_grpc_reply(_frame(stubs))
    backend = Endpoint(DIRECT, nginx.h2_port, nginx.proc)
    result, failures = _scenario(
        backend,
        stubs,
        workdir,
        rounds,
        round_seconds,
        "gRPC unary (nginx reply)",
        (
            "backend: nginx answers every /l7bench.Bench/ call with a fixed reply frame and a "
            "grpc-status: 0 trailer (grpcio accepts it); this measures the proxies, not a server",
        ),
    )
    record(result)
    assert not failures, "; ".join(failures)
