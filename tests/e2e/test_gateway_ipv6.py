"""The gateway listening and forwarding on IPv6 (issue 17): curl -6 to [::1], an IPv6 upstream,
the source identity from an IPv6 --peer CIDR, and the L7 rule's 200 / 403; gRPC over IPv6 with
one method denied."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.e2e.peers import flow_log_lines, policy_yaml
from tests.services.backend_server import handler

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def free_port6() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


@pytest.fixture
def backend6():
    server = _Server6(("::1", 0), handler(lambda _: b"hello over ipv6\n"))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def curl6(url: str) -> str:
    r = subprocess.run(
        ["curl", "-6", "-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", url],
        capture_output=True,
        text=True,
    )
    return r.stdout


@contextlib.contextmanager
def gateway6(args: list[str]):
    """`l7proxy gateway ARGS` until its `ready:` line; stopped afterwards."""
    err = open(tempfile.mktemp(prefix="l7proxy-gw6-"), "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "l7proxy", "gateway", *args],
        stdout=subprocess.DEVNULL, stderr=err, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "ready:" not in Path(err.name).read_text():
            assert proc.poll() is None, Path(err.name).read_text()
            assert time.monotonic() < deadline, Path(err.name).read_text()
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)
        err.close()
        Path(err.name).unlink()


def test_grpc_over_ipv6_through_the_gateway(tmp_path):
    from concurrent import futures

    import grpc

    from tests.e2e.protos.grpc_service import OPTIONS, compile_echo, make_servicer

    (tmp_path / "protos").mkdir()
    pb2, pb2_grpc = compile_echo(tmp_path / "protos")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=OPTIONS)
    servicer = make_servicer(pb2, pb2_grpc)
    pb2_grpc.add_EchoServicer_to_server(servicer, server)
    upstream = server.add_insecure_port("[::1]:0")
    server.start()
    port = free_port6()
    policy = tmp_path / "grpc.yaml"
    policy.write_text(
        policy_yaml(port, '- method: POST\n          path: "/l7test.Echo/Unary"').replace(
            "app: web", "app: grpc"
        )
    )
    try:
        with gateway6(
            ["--listen", f"[::1]:{port}", "--upstream", f"[::1]:{upstream}", "--policy",
             str(policy), "--labels", "app=grpc", "--protocol", "http2"]
        ):  # fmt: skip
            with grpc.insecure_channel(f"ipv6:[::1]:{port}", options=OPTIONS) as channel:
                stub = pb2_grpc.EchoStub(channel)
                assert stub.Unary(pb2.Msg(text="hi6"), timeout=10).text == "hi6"
                with pytest.raises(grpc.RpcError) as denied:
                    stub.Secret(pb2.Msg(), timeout=10)
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "Secret" not in servicer.calls
    finally:
        server.stop(grace=None)


def test_gateway_listens_and_forwards_on_ipv6(backend6, tmp_path):
    port = free_port6()
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        policy_yaml(port, from_block="fromEndpoints: [{matchLabels: {org: empire}}]\n    ")
    )
    flows = tmp_path / "flows.log"
    with gateway6(
        ["--listen", f"[::1]:{port}", "--upstream", f"[::1]:{backend6}", "--policy", str(policy),
         "--labels", "app=web", "--peer", "::1/128=org=empire", "--flow-log", str(flows)]
    ):  # fmt: skip
        assert curl6(f"http://[::1]:{port}/public/a") == "200"
        assert curl6(f"http://[::1]:{port}/private") == "403"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            seen = flow_log_lines(flows)
            if len([f for f in seen if f.get("event_type") == "L7"]) >= 2:
                break
            time.sleep(0.1)
        l7 = [f for f in seen if f.get("event_type") == "L7"]
        assert {f["verdict"] for f in l7} == {"FORWARDED", "DROPPED"}, seen
        assert all(f["source"]["ip"] == "::1" for f in l7), l7
        assert all("org=empire" in f["source"]["labels"] for f in l7), l7
