"""gRPC through the HTTP/2 gateway with real grpcio servers and clients (issue 5).

Every call kind runs three ways: direct, through a gateway whose policy allows the service, and
through a gateway whose policy denies one method (Secret). The results must be identical to the
direct call, except that Secret gets PERMISSION_DENIED through the second gateway.
"""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

from tests.e2e.peers import Gateway, free_port
from tests.e2e.protos.grpc_service import OPTIONS, EchoServer, compile_echo

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SERVICE = "/l7test.Echo/"
ALLOW_SERVICE = f'- method: POST\n          path: "{SERVICE}.*"'
ALLOW_ALL_BUT_SECRET = f'- method: POST\n          path: "{SERVICE}(Unary|ClientStream|ServerStream|Bidi|Sleep|Missing)"'


def grpc_policy(port: int, rules: str) -> str:
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: grpc
spec:
  endpointSelector:
    matchLabels:
      app: grpc
  ingress:
  - toPorts:
    - ports:
      - port: "{port}"
        protocol: TCP
      rules:
        http:
        {rules}
"""


@pytest.fixture(scope="module")
def echo(tmp_path_factory):
    pb2, pb2_grpc = compile_echo(tmp_path_factory.mktemp("protos"))
    server = EchoServer(pb2, pb2_grpc)
    yield pb2, pb2_grpc, server
    server.stop()


def _gateway(tmp_path_factory, upstream: int, rules: str, name: str) -> Gateway:
    work = tmp_path_factory.mktemp(name)
    port = free_port()
    policy = work / "policy.yaml"
    policy.write_text(grpc_policy(port, rules))
    return Gateway(
        [
            "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{upstream}",
            "--policy", str(policy),
            "--labels", "app=grpc",
            "--protocol", "http2",
            "--admin", "127.0.0.1:0",
        ],
        flow_log=str(work / "flows.log"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def gateways(echo, tmp_path_factory):
    _, _, server = echo
    allow = _gateway(tmp_path_factory, server.port, ALLOW_SERVICE, "gw-allow")
    deny = _gateway(tmp_path_factory, server.port, ALLOW_ALL_BUT_SECRET, "gw-deny")
    yield {"direct": server.port, "allow": allow.port, "deny": deny.port, "_gws": (allow, deny)}
    allow.stop()
    deny.stop()


@pytest.fixture(params=["direct", "allow", "deny"])
def target(request, gateways, echo):
    pb2, pb2_grpc, server = echo
    channel = grpc.insecure_channel(f"127.0.0.1:{gateways[request.param]}", options=OPTIONS)
    grpc.channel_ready_future(channel).result(timeout=10)
    yield request.param, pb2, pb2_grpc.EchoStub(channel), server, channel
    channel.close()


def test_unary(target):
    _, pb2, stub, _, _ = target
    assert stub.Unary(pb2.Msg(text="hi"), timeout=10).text == "hi"


def test_client_streaming(target):
    _, pb2, stub, _, _ = target
    reply = stub.ClientStream(iter([pb2.Msg(text=str(i), blob=b"x" * 1000) for i in range(50)]))
    assert reply.text == ",".join(str(i) for i in range(50))
    assert reply.count == 50_000


def test_server_streaming(target):
    _, pb2, stub, _, _ = target
    got = [m.text for m in stub.ServerStream(pb2.Msg(text="s", count=100), timeout=10)]
    assert got == [f"s-{i}" for i in range(100)]


def test_bidi_ping_pong(target):
    _, pb2, stub, _, _ = target
    outbox: list = []
    ready = threading.Event()

    def requests():
        for i in range(20):
            outbox.append(i)
            yield pb2.Msg(text=f"ping {i}", count=i)
            ready.wait(5)  # strictly alternating: the next ping after the pong
            ready.clear()

    replies = []
    for reply in stub.Bidi(requests(), timeout=20):
        replies.append(reply.text)
        ready.set()
    assert replies == [f"pong ping {i}" for i in range(20)]


def test_empty_stream(target):
    _, pb2, stub, _, _ = target
    assert stub.ClientStream(iter([]), timeout=10).text == ""
    assert list(stub.ServerStream(pb2.Msg(count=0), timeout=10)) == []
    assert list(stub.Bidi(iter([]), timeout=10)) == []


def test_large_message_4mib(target):
    _, pb2, stub, _, _ = target
    blob = bytes(range(256)) * (4 * 1024 * 1024 // 256)
    reply = stub.Unary(pb2.Msg(text="big", blob=blob), timeout=30)
    assert reply.count == len(blob) and reply.blob == blob


def test_custom_metadata_both_ways(target):
    _, pb2, stub, _, _ = target
    reply, call = stub.Unary.with_call(
        pb2.Msg(text="md"),
        metadata=(("x-client", "abc"), ("x-client-bin", b"\x00\x01\xff")),
        timeout=10,
    )
    assert reply.text == "md"
    assert ("x-server-initial", "yes") in call.initial_metadata()
    trailing = dict(call.trailing_metadata())
    assert trailing["x-server-trailing"] == "abc"
    assert trailing["x-echo-bin"] == b"\x00\x01\xff"


def test_status_code_and_message_pass_through(target):
    _, pb2, stub, _, _ = target
    with pytest.raises(grpc.RpcError) as err:
        stub.Unary(pb2.Msg(text="nicht gefunden: 100% ✓", code=5), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert err.value.details() == "nicht gefunden: 100% ✓"


def test_unimplemented_method(target):
    _, pb2, _, _, channel = target
    missing = channel.unary_unary(
        SERVICE + "Missing",
        request_serializer=pb2.Msg.SerializeToString,
        response_deserializer=pb2.Msg.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        missing(pb2.Msg(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_cancel_after_begin(target):
    _, pb2, stub, _, _ = target
    stop = threading.Event()

    def never():
        stop.wait(10)
        return
        yield  # noqa: B901 - makes this a generator

    future = stub.ClientStream.future(never(), timeout=20)
    time.sleep(0.2)
    assert future.cancel()
    stop.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    assert stub.Unary(pb2.Msg(text="after"), timeout=10).text == "after"  # channel still fine


def test_cancel_after_first_response(target):
    _, pb2, stub, server, _ = target
    before = server.servicer.cancelled.count("ServerStream")
    call = stub.ServerStream(pb2.Msg(text="c", count=1000, seconds=0.02), timeout=20)
    first = next(call)
    assert first.text == "c-0"
    call.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    end = time.monotonic() + 5
    while server.servicer.cancelled.count("ServerStream") == before and time.monotonic() < end:
        time.sleep(0.05)
    assert server.servicer.cancelled.count("ServerStream") > before  # RST reached the server


def test_deadline_exceeded_on_sleeping_server(target):
    _, pb2, stub, _, _ = target
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        stub.Sleep(pb2.Msg(seconds=3), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 2.5


def test_denied_method_only_through_the_deny_gateway(target):
    name, pb2, stub, server, _ = target
    calls = server.servicer.calls.count("Secret")
    if name == "deny":
        with pytest.raises(grpc.RpcError) as err:
            stub.Secret(pb2.Msg(), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.value.details() == "Access denied"
        assert server.servicer.calls.count("Secret") == calls  # never reached the server
        assert stub.Unary(pb2.Msg(text="still ok"), timeout=10).text == "still ok"
    else:
        assert stub.Secret(pb2.Msg(), timeout=10).text == "the secret"


def test_flows_carry_protocol_and_grpc_method(gateways, echo):
    pb2, pb2_grpc, _ = echo
    _, deny = gateways["_gws"]
    with grpc.insecure_channel(f"127.0.0.1:{deny.port}", options=OPTIONS) as channel:
        stub = pb2_grpc.EchoStub(channel)
        stub.Unary(pb2.Msg(text="flow"), timeout=10)
        with pytest.raises(grpc.RpcError):
            stub.Secret(pb2.Msg(), timeout=10)
    end = time.monotonic() + 5
    flows: list[dict] = []
    while time.monotonic() < end:
        flows = deny.flows()
        if any(f["verdict"] == "DROPPED" for f in flows) and any(
            f["l7"]["http"].get("grpc", {}).get("status") == "OK" for f in flows
        ):
            break
        time.sleep(0.1)
    http = [f["l7"]["http"] for f in flows]
    assert all(h["protocol"] == "HTTP/2" for h in http)
    ok = [f for f in flows if f["l7"]["http"]["url"] == SERVICE + "Unary"]
    assert ok and ok[-1]["verdict"] == "FORWARDED"
    assert ok[-1]["l7"]["http"]["grpc"] == {
        "method": SERVICE + "Unary",
        "status_code": 0,
        "status": "OK",
    }
    denied = [f for f in flows if f["l7"]["http"]["url"] == SERVICE + "Secret"]
    assert denied and denied[-1]["verdict"] == "DROPPED"
    assert denied[-1]["drop_reason_desc"] == "POLICY_DENIED"
    assert denied[-1]["l7"]["http"]["grpc"]["status"] == "PERMISSION_DENIED"
    assert json.dumps(denied[-1])  # JSON-serializable as written


def _gateway_with_limits(tmp_path, upstream: int, limits: dict) -> Gateway:
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(grpc_policy(port, ALLOW_SERVICE))
    config = tmp_path / "limits.yaml"
    config.write_text("limits:\n" + "".join(f"  {k}: {v}\n" for k, v in limits.items()))
    return Gateway(
        [
            "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{upstream}",
            "--policy", str(policy),
            "--labels", "app=grpc",
            "--protocol", "http2",
            "-c", str(config),
        ],
    )  # fmt: skip


def test_silent_long_call_is_not_cut_by_the_idle_timer(echo, tmp_path):
    pb2, pb2_grpc, server = echo
    gw = _gateway_with_limits(tmp_path, server.port, {"idle_timeout": 1})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{gw.port}", options=OPTIONS) as channel:
            stub = pb2_grpc.EchoStub(channel)
            # 3 s without a single frame on the connection, idle timeout 1 s
            assert stub.Sleep(pb2.Msg(seconds=3), timeout=10).text == "woke up"
            stream = stub.ServerStream(pb2.Msg(text="t", count=4, seconds=1.2), timeout=20)
            assert [m.text for m in stream] == ["t-0", "t-1", "t-2", "t-3"]
    finally:
        gw.stop()


def test_sigterm_drains_with_goaway_and_calls_in_flight_finish(echo, tmp_path):
    pb2, pb2_grpc, server = echo
    gw = _gateway_with_limits(tmp_path, server.port, {"drain_time": 10})
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{gw.port}", options=OPTIONS)
        stub = pb2_grpc.EchoStub(channel)
        assert stub.Unary(pb2.Msg(text="warm"), timeout=10).text == "warm"
        future = stub.Sleep.future(pb2.Msg(seconds=1.5), timeout=10)
        time.sleep(0.3)
        gw.signal(15)
        assert future.result().text == "woke up"  # the call in flight finished
        assert gw.proc.wait(15) == 0
        assert "drained" in gw.log()
        channel.close()
    finally:
        gw.stop()
