"""Kafka through the real `l7proxy gateway --protocol kafka` process, policy from YAML
(CiliumNetworkPolicy kafka rules: role + topic), against a real noida-db broker.

The gateway is started with the broker map installed (l7proxy.kafka.settings.set_broker_map,
the switch that makes Metadata advertise the gateway), the way the gateway command is meant to
install it from its Kafka listeners.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from tests.conftest import REPO
from tests.e2e.kafka_broker import KafkaBroker, free_port
from tests.e2e.peers import ADMIN_RE, LISTEN_RE

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WRAPPER = """
import ast, sys
from l7proxy.config import HostPort, ListenerConfig
from l7proxy.kafka.settings import gateway_broker_map, set_broker_map
listen, upstream = HostPort.parse(sys.argv[1]), HostPort.parse(sys.argv[2])
set_broker_map(gateway_broker_map([ListenerConfig(listen, upstream, "kafka")]))
from l7proxy.cli import main
sys.exit(main(["gateway", "--listen", sys.argv[1], "--upstream", sys.argv[2], *sys.argv[3:]]))
"""

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


class KafkaGateway:
    """`l7proxy gateway --protocol kafka` (through WRAPPER) as a subprocess; ready when its
    stderr says so."""

    def __init__(self, listen: str, upstream: str, args: list[str], tmp_path) -> None:
        self.flow_log = tmp_path / "flows.log"
        self.err_path = tmp_path / "gateway.err"
        self._err = open(self.err_path, "w+")  # noqa: SIM115
        cmd = [sys.executable, "-c", WRAPPER, listen, upstream, *args,
               "--flow-log", str(self.flow_log)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self._err,
                                     cwd=REPO, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            text = self.err_path.read_text()
            if "ready:" in text:
                self.port = int(LISTEN_RE.search(text).group(1))
                self.admin_port = int(ADMIN_RE.search(text).group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {text}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(self.err_path.read_text())

    def flows(self) -> list[dict]:
        if not self.flow_log.exists():
            return []
        return [json.loads(line) for line in self.flow_log.read_text().splitlines() if line]

    def wait_flows(self, predicate, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while not predicate(flows := self.flows()) and time.monotonic() < deadline:
            time.sleep(0.05)
        return flows

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._err.close()


@pytest.fixture(scope="module")
def broker():
    b = KafkaBroker().start()
    yield b
    b.stop()


@pytest.fixture(params=["kafka", "auto"])
def gateway(broker, tmp_path, request):
    """The gateway with --protocol kafka, and with --protocol auto (sniffed as Kafka)."""
    topic = f"gw-{uuid.uuid4().hex[:8]}"
    port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(port=port, topic=topic))
    gw = KafkaGateway(
        f"127.0.0.1:{port}", broker.address,
        ["--policy", str(policy), "--labels", "app=kafka", "--protocol", request.param,
         "--admin", "127.0.0.1:0"],
        tmp_path,
    )  # fmt: skip
    gw.topic = topic
    yield gw
    gw.stop()


def test_gateway_produce_consume_and_denied_topic(gateway):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError

    address = f"127.0.0.1:{gateway.port}"
    topic = gateway.topic

    async def main():
        producer = AIOKafkaProducer(bootstrap_servers=address)
        await producer.start()
        try:
            for i in range(5):
                await producer.send_and_wait(topic, b"g%d" % i)
            started = time.monotonic()
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait("not-allowed", b"x")
            denied_after = time.monotonic() - started
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=address, group_id=f"g-{topic}",
            auto_offset_reset="earliest",
        )  # fmt: skip
        await consumer.start()
        got = []
        try:
            async for msg in consumer:
                got.append(msg.value)
                if len(got) == 5:
                    break
            await consumer.commit()
        finally:
            await consumer.stop()
        return got, denied_after

    got, denied_after = asyncio.run(asyncio.wait_for(main(), 60))
    assert got == [b"g%d" % i for i in range(5)]
    assert denied_after < 2.0
    flows = gateway.wait_flows(lambda fl: any(f["verdict"] == "DROPPED" for f in fl))
    kafka = [f for f in flows if f.get("l7", {}).get("kafka")]
    forwarded = {(f["l7"]["kafka"]["api_key"], f["l7"]["kafka"]["topic"])
                 for f in kafka if f["verdict"] == "FORWARDED"}  # fmt: skip
    assert {("produce", topic), ("fetch", topic), ("offsetcommit", topic)} <= forwarded
    dropped = [f for f in kafka if f["verdict"] == "DROPPED"]
    assert dropped and dropped[0]["l7"]["kafka"]["topic"] == "not-allowed"
    assert dropped[0]["l7"]["kafka"]["error_code"] == 29
    assert dropped[0]["source"]["identity"] == 2  # world: no --peer given
    metrics = (
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.admin_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert 'policy_l7_total{rule="denied",proto="kafka"}' in metrics
    assert "l7proxy_kafka_request_duration_seconds_bucket" in metrics
    json.dumps(flows)  # every flow is plain JSON
