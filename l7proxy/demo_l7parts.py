"""The Kafka and gRPC parts of `make demo`.

With root and BPF (`node_parts`): the broker, its clients, the door manager and a terminal are
endpoints of the running agent, and the node proxy enforces both policies on the redirected
flows. Without (`kafka_part`, `grpc_part`): the same policies through `l7proxy gateway` on loopback.

Gateway mode, Kafka: the empire's broker (noida-db, a Kafka-protocol broker) behind two listeners, one
that knows its clients as app=empire-hq and one that knows them as app=empire-outpost (on loopback
every client comes from 127.0.0.1, so the listener is what carries the identity here). HQ produces
to deathstar-plans and empire-announce; an outpost consumes empire-announce, may not produce to it
and may not read deathstar-plans. gRPC: Cloud City's DoorManager behind an HTTP/2 gateway; a
public terminal may call GetName and RequestMaintenance but not SetAccessCode.
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


RUN_TAG = "l7demo-"  # main() sets the run's prefix; it names the brokers' data directories


def noida() -> str:
    """The broker binary itself. The `noida-db` console script is a Python wrapper that runs it
    with subprocess.call and does not pass signals on: stopping the wrapper left the broker
    running (orphans with /tmp/l7proxy-demo-kafka-* data dirs piled up across demo runs)."""
    with contextlib.suppress(ImportError):
        from importlib.resources import files

        binary = Path(str(files("noida_db").joinpath("noida-db")))
        if binary.is_file():
            return str(binary)
    raise RuntimeError("noida-db is not installed (make setup installs it)")


def kafka_data_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix=f"l7proxy-demo-kafka-{RUN_TAG}"))


def sweep_brokers(tag: str) -> list[int]:
    """Stop orphaned brokers of earlier runs with this prefix (their demo is gone: a demo killed
    with SIGKILL cannot stop its broker, which init or a subreaper then adopts); a broker whose
    parent is a running demo is left alone. Returns the pids stopped."""
    import os
    import signal

    mark = f"l7proxy-demo-kafka-{tag}".encode()
    stopped = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"noida-db" not in cmdline or mark not in cmdline:
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            parent = b""
        if b"l7proxy.demo" not in parent:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)
                stopped.append(int(proc.name))
    return stopped


def start_group(argv: list[str], **kw) -> subprocess.Popen:
    """A child in its own process group, so `stop` reaches whatever it starts in turn."""
    return subprocess.Popen(argv, start_new_session=True, **kw)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left of it after `timeout`."""
    import os
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, or the group looks alive while it is a zombie
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


class Procs:
    """Child processes of one part, all stopped at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = start_group(argv, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in reversed(self.procs):
            stop(proc)


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
        bootstrap_servers=bootstrap,
        request_timeout_ms=5000,
        enable_auto_commit=False,
    )

    async def read() -> list[str]:
        await consumer.start()
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        batch = await consumer.getmany(tp, timeout_ms=2000)
        return [m.value.decode() for m in batch.get(tp, [])]

    try:
        # A denied topic never gets a partition leader: the client keeps asking, so bound it.
        values = await asyncio.wait_for(read(), 4)
        return f"read {values}" if values else "read nothing"
    except TimeoutError:
        return "read nothing (no metadata for the topic within 4 s)"
    except KafkaError as exc:
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
    tmp = kafka_data_dir()
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


def serve_door_manager(port: int, host: str = "127.0.0.1") -> None:
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
    server.add_insecure_port(f"{host}:{port}")
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


def main(argv: list[str]) -> int:
    """Helpers the demo runs inside endpoint namespaces:
    produce BOOTSTRAP TOPIC VALUE | consume BOOTSTRAP TOPIC | grpc TARGET METHOD | doors IP PORT"""
    what, *rest = argv
    if what == "produce":
        print(asyncio.run(_produce(rest[0], rest[1], rest[2].encode())), flush=True)
    elif what == "consume":
        print(asyncio.run(_consume(rest[0], rest[1])), flush=True)
    elif what == "grpc":
        text, ok = _call(rest[0], rest[1])
        print(text, flush=True)
        return 0 if ok else 3
    elif what == "doors":
        serve_door_manager(int(rest[1]), host=rest[0])
    else:
        raise SystemExit(f"unknown helper {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# -- node mode: the same parts on real namespaces through the agent's node proxy -----------------


def _in_ns(story, prefix: str, ns: str, *args: str) -> tuple[str, int]:
    argv = ["ip", "netns", "exec", prefix + ns, sys.executable, "-m", "l7proxy.demo_l7parts", *args]
    story.command(
        ["ip", "netns", "exec", prefix + ns, "python", "-m", "l7proxy.demo_l7parts", *args]
    )
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no result within 30 s", -1
    return r.stdout.strip(), r.returncode


def node_parts(story, agent, run_cli, procs: list) -> None:
    """Kafka and gRPC on endpoints of the running agent (node mode, BPF redirect, node proxy)."""
    import json

    from l7proxy.demo import Outcome

    env, prefix = agent.env, agent.prefix
    story.step("Kafka and gRPC endpoints: the empire's broker, its clients, Cloud City's doors")
    for name, labels in (
        ("kafka", "app=kafka"),
        ("empire-hq", "app=empire-hq"),
        ("empire-outpost", "app=empire-outpost"),
        ("cc-door-mgr", "app=cc-door-mgr"),
        ("terminal", "app=public-terminal"),
    ):
        run_cli(story, env, "endpoint", "create", name, "--labels", labels)
    ips = {
        e["name"]: e["ip"] for e in json.loads(agent.cli("endpoint", "list", "-o", "json").stdout)
    }
    kafka, doors = ips["kafka"], ips["cc-door-mgr"]
    data = kafka_data_dir()
    procs.append(lambda: shutil.rmtree(data, ignore_errors=True))
    argv = [
        noida(),
        "start",
        "--only",
        "kafka",
        "--host",
        kafka,
        "--kafka-port",
        "9092",
        "--data-dir",
        str(data),
    ]
    story.command(["ip", "netns", "exec", prefix + "kafka", "noida-db", *argv[1:]])
    broker = start_group(
        ["ip", "netns", "exec", prefix + "kafka", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(broker)
    door_argv = [sys.executable, "-m", "l7proxy.demo_l7parts", "doors", doors, "50051"]
    story.command(["ip", "netns", "exec", prefix + "cc-door-mgr", "python", *door_argv[1:]])
    door = start_group(
        ["ip", "netns", "exec", prefix + "cc-door-mgr", *door_argv],
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(door)
    door.stdout.readline()
    _wait_in_ns(prefix + "kafka", kafka, 9092)

    story.step("Kafka policy: produce and consume roles per topic (enforced by the node proxy)")
    print(KAFKA_POLICY.read_text().strip())
    run_cli(story, env, "policy", "import", str(KAFKA_POLICY))
    boot = f"{kafka}:9092"
    for ns, args, want, good in (
        (
            "empire-hq",
            ("produce", boot, "deathstar-plans", "exhaust port is 2 m wide"),
            "produced",
            lambda s: s == "produced",
        ),
        (
            "empire-hq",
            ("produce", boot, "empire-announce", "the deathstar is operational"),
            "produced",
            lambda s: s == "produced",
        ),
        (
            "empire-outpost",
            ("consume", boot, "empire-announce"),
            "reads the announcement",
            lambda s: "operational" in s,
        ),
        (
            "empire-outpost",
            ("produce", boot, "empire-announce", "rebels!"),
            "refused (TopicAuthorizationFailed)",
            lambda s: "Authorization" in s,
        ),
        (
            "empire-outpost",
            ("consume", boot, "deathstar-plans"),
            "denied: none of the plans reach it",
            lambda s: "exhaust port" not in s,
        ),
    ):
        seen, _ = _in_ns(story, prefix, ns, *args)
        story.expect(f"{ns} {args[0]} {args[2]}", Outcome(seen, None), want, good(seen))
    denied = agent.client.call(
        "observe",
        filter={"verdict": "DROPPED", "protocol": "kafka", "from_labels": ["app=empire-outpost"]},
        last=1,
    )
    story.expect(
        "kafka flows",
        Outcome(f"{'a' if denied else 'no'} DROPPED kafka flow from empire-outpost", None),
        "the proxy's denial is in observe",
        bool(denied),
    )

    story.step("gRPC policy: one rule per DoorManager method")
    print(GRPC_POLICY.read_text().strip())
    run_cli(story, env, "policy", "import", str(GRPC_POLICY))
    for method, allowed in (
        ("GetName", True),
        ("RequestMaintenance", True),
        ("SetAccessCode", False),
    ):
        seen, rc = _in_ns(story, prefix, "terminal", "grpc", f"{doors}:50051", method)
        want = "answered" if allowed else "PERMISSION_DENIED"
        good = rc == 0 if allowed else (rc != 0 and seen.startswith("PERMISSION_DENIED"))
        story.expect(f"terminal {method}", Outcome(seen, None), want, good)


def _wait_in_ns(netns: str, host: str, port: int, timeout: float = 20.0) -> None:
    probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=0.5).close()"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-c", probe], capture_output=True
        )
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {host}:{port} in {netns}")
