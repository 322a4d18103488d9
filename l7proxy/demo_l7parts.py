"""The Kafka and gRPC parts of `make demo`, both through `l7proxy gateway` on loopback.

Kafka: the empire's broker (noida-db, a Kafka-protocol broker) behind two gateway listeners, one
that knows its clients as app=empire-hq and one that knows them as app=empire-outpost (on loopback
every client comes from 127.0.0.1, so the listener is what carries the identity here). HQ produces
to deathstar-plans and empire-announce; an outpost consumes empire-announce, may not produce to it
and may not read deathstar-plans. gRPC: Cloud City's DoorManager behind an HTTP/2 gateway; a
public terminal may call GetName and RequestMaintenance but not SetAccessCode.

These run through the gateway rather than the node proxy because the node proxy's HTTP/2 and
Kafka upstream connections do not carry the source identity mark yet (docs/agent.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KAFKA_POLICY = REPO / "demo" / "kafka_policy.yaml"
GRPC_POLICY = REPO / "demo" / "grpc_policy.yaml"
HQ_LISTENER = "127.0.9.1"
OUTPOST_LISTENER = "127.0.9.2"
GRPC_LISTENER = "127.0.10.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


def noida() -> str:
    path = shutil.which("noida-db") or str(Path(sys.executable).parent / "noida-db")
    if not Path(path).exists():
        raise RuntimeError("noida-db is not installed (make setup installs it)")
    return path


class Procs:
    """Child processes of one part, all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(5)
            with contextlib.suppress(Exception):
                proc.kill()


def gateway_argv(
    listen: str, upstream: str, policy: Path, labels: str, peer: str, proto: str, flow_log: Path
) -> list[str]:
    return [
        "gateway",
        "--listen",
        listen,
        "--upstream",
        upstream,
        "--protocol",
        proto,
        "--policy",
        str(policy),
        "--labels",
        labels,
        "--peer",
        peer,
        "--flow-log",
        str(flow_log),
    ]


KAFKA_GATEWAY = """
import ast, sys
from l7proxy.kafka.settings import set_broker_map
set_broker_map(ast.literal_eval(sys.argv[1]))
from l7proxy.cli import main
sys.exit(main(sys.argv[2:]))
"""

# -- Kafka ---------------------------------------------------------------------------------------


async def _produce(bootstrap: str, topic: str, value: bytes) -> str:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await producer.start()
        await asyncio.wait_for(producer.send_and_wait(topic, value), 8)
        return "produced"
    except (KafkaError, TimeoutError) as exc:
        return f"refused: {type(exc).__name__}"
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()


async def _consume(bootstrap: str, topic: str) -> str:
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, request_timeout_ms=5000, enable_auto_commit=False
    )
    try:
        await consumer.start()
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await asyncio.wait_for(consumer.getmany(tp, timeout_ms=2000), 8)
        values = [m.value.decode() for m in batch.get(tp, [])]
        return f"read {values}" if values else "read nothing"
    except (KafkaError, TimeoutError) as exc:
        return f"refused: {type(exc).__name__}"
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


def _denied(flow_log: Path, topic: str) -> bool:
    """The gateway wrote a DROPPED Kafka flow naming this topic."""
    import json

    for line in flow_log.read_text().splitlines():
        flow = json.loads(line)
        kafka = (flow.get("l7") or {}).get("kafka") or {}
        if flow.get("verdict") == "DROPPED" and kafka.get("topic") == topic:
            return True
    return False


def kafka_part(story, run_cli, env) -> None:

    story.step("Kafka: the empire's broker, produce and consume roles per topic (gateway mode)")
    story.say("HQ connects through a listener that knows it as app=empire-hq, outposts through")
    story.say("one that knows them as app=empire-outpost; both enforce demo/kafka_policy.yaml.")
    print(KAFKA_POLICY.read_text().strip())
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="l7proxy-demo-kafka-"))
    try:
        broker_port = free_port()
        argv = [
            noida(),
            "start",
            "--only",
            "kafka",
            "--kafka-port",
            str(broker_port),
            "--data-dir",
            str(tmp / "data"),
        ]
        story.command(["noida-db", *argv[1:]])
        procs.start(argv)
        wait_port("127.0.0.1", broker_port)
        flow_log = tmp / "flows.jsonl"
        for host, labels in (
            (HQ_LISTENER, "app=empire-hq"),
            (OUTPOST_LISTENER, "app=empire-outpost"),
        ):
            gw = gateway_argv(
                f"{host}:9092",
                f"127.0.0.1:{broker_port}",
                KAFKA_POLICY,
                "app=kafka",
                f"127.0.0.0/8={labels}",
                "kafka",
                flow_log,
            )
            story.command(["l7proxy", *gw])
            # The gateway must advertise itself in Metadata so clients never go around it;
            # l7proxy.kafka.settings.set_broker_map is that switch (the gateway command does
            # not call it yet), so the demo starts the gateway with the map installed.
            broker_map = {("127.0.0.1", broker_port): (host, 9092)}
            procs.start([sys.executable, "-c", KAFKA_GATEWAY, repr(broker_map), *gw])
            wait_port(host, 9092)

        hq, outpost = f"{HQ_LISTENER}:9092", f"{OUTPOST_LISTENER}:9092"
        checks = [
            (
                "empire-hq produces to deathstar-plans",
                _produce(hq, "deathstar-plans", b"exhaust port is 2 m wide"),
                "produced",
                lambda s: s == "produced",
            ),
            (
                "empire-hq produces to empire-announce",
                _produce(hq, "empire-announce", b"the deathstar is operational"),
                "produced",
                lambda s: s == "produced",
            ),
            (
                "empire-outpost consumes empire-announce",
                _consume(outpost, "empire-announce"),
                "reads the announcement",
                lambda s: "operational" in s,
            ),
            (
                "empire-outpost produces to empire-announce",
                _produce(outpost, "empire-announce", b"rebels!"),
                "refused (TopicAuthorizationFailed)",
                lambda s: s.startswith("refused") and "Authorization" in s,
            ),
            (
                "empire-outpost consumes deathstar-plans",
                _consume(outpost, "deathstar-plans"),
                "denied: none of the plans reach it (Metadata refused)",
                lambda s: "exhaust port" not in s and _denied(flow_log, "deathstar-plans"),
            ),
        ]
        for who, coro, want, good in checks:
            story.command(["kafka-client", who])
            seen = asyncio.run(coro)
            from l7proxy.demo import Outcome

            story.expect(who, Outcome(seen, None), want, good(seen))
        time.sleep(0.3)
        run_cli(
            story, env, "observe", "--file", str(flow_log), "--verdict", "DROPPED", "--last", "3"
        )
    finally:
        procs.close()
        shutil.rmtree(tmp, ignore_errors=True)


# -- gRPC ----------------------------------------------------------------------------------------

DOORS = {
    "GetName": b"Door 42: Cloud City, carbon-freeze chamber",
    "GetLocation": b"Level 3, sector 5",
    "RequestMaintenance": b"Maintenance requested",
    "SetAccessCode": b"Access code changed",
    "GetState": b"Locked",
}


def serve_door_manager(port: int) -> None:
    """Cloud City's DoorManager as a gRPC service with raw-bytes messages (no proto needed)."""
    from concurrent import futures

    import grpc

    def handler(answer: bytes):
        return grpc.unary_unary_rpc_method_handler(lambda request, context: answer)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "cloudcity.DoorManager", {m: handler(a) for m, a in DOORS.items()}
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def _call(target: str, method: str) -> tuple[str, bool]:
    import grpc

    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_unary(f"/cloudcity.DoorManager/{method}")
        try:
            return stub(b"door-42", timeout=5).decode(), True
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}", False


def grpc_part(story, run_cli, env) -> None:
    from l7proxy.demo import Outcome

    story.step("gRPC: Cloud City's door manager, one rule per method (gateway mode, HTTP/2)")
    print(GRPC_POLICY.read_text().strip())
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="l7proxy-demo-grpc-"))
    try:
        port = free_port()
        server = procs.start(
            [
                sys.executable,
                "-c",
                f"from l7proxy.demo_l7parts import serve_door_manager; serve_door_manager({port})",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        server.stdout.readline()
        flow_log = tmp / "flows.jsonl"
        gw = gateway_argv(
            f"{GRPC_LISTENER}:50051",
            f"127.0.0.1:{port}",
            GRPC_POLICY,
            "app=cc-door-mgr",
            "127.0.0.0/8=app=public-terminal",
            "http2",
            flow_log,
        )
        story.command(["l7proxy", *gw])
        procs.start([sys.executable, "-m", "l7proxy", *gw])
        wait_port(GRPC_LISTENER, 50051)
        target = f"{GRPC_LISTENER}:50051"
        for method, allowed in (
            ("GetName", True),
            ("RequestMaintenance", True),
            ("SetAccessCode", False),
        ):
            story.command(["grpc-call", f"{target}", f"/cloudcity.DoorManager/{method}"])
            text, ok = _call(target, method)
            want = "answered" if allowed else "PERMISSION_DENIED"
            good = ok if allowed else (not ok and text.startswith("PERMISSION_DENIED"))
            story.expect(f"public-terminal {method}", Outcome(text, None), want, good)
        time.sleep(0.3)
        run_cli(story, env, "observe", "--file", str(flow_log), "--last", "10")
    finally:
        procs.close()
        shutil.rmtree(tmp, ignore_errors=True)
