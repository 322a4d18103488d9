"""Kafka through the real `l7proxy gateway --protocol kafka` process, policy from YAML
(CiliumNetworkPolicy kafka rules: role + topic), against a real noida-db broker.

The command installs the broker map itself (from its Kafka listeners), so Metadata and
FindCoordinator advertise the gateway: the clients here never connect to the broker directly.
"""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request

import pytest

from tests.e2e.kafka_broker import produce_denied_then_consume, start_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(params=["kafka", "auto"])
def gateway(broker, tmp_path, request):
    """The gateway with --protocol kafka, and with --protocol auto (sniffed as Kafka)."""
    gw = start_gateway(broker, tmp_path, request.param)
    yield gw
    gw.stop()


def own_tcp_peers() -> set[tuple[str, int]]:
    """(ip, port) of every TCP socket of this process connected somewhere (IPv4)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = set()
    for line in open("/proc/net/tcp").read().splitlines()[1:]:  # noqa: SIM115
        fields = line.split()
        if fields[9] in inodes and fields[3] == "01":  # ESTABLISHED
            ip_hex, port_hex = fields[2].split(":")
            ip = ".".join(str(b) for b in bytes.fromhex(ip_hex)[::-1])
            peers.add((ip, int(port_hex, 16)))
    return peers


def seen_brokers(client) -> set[tuple[str, int]]:
    """Every broker address an aiokafka client learned from Metadata (it resolves the
    FindCoordinator node id through the same table; its connections are checked separately)."""
    return {(b.host, b.port) for b in client.cluster.brokers()}


def test_gateway_produce_consume_and_denied_topic(gateway):
    address = f"127.0.0.1:{gateway.port}"
    topic = gateway.topic

    def inspect(consumer):
        # The group coordinator and partition leader came from rewritten responses, and
        # aiokafka keeps its connections open: none of them may lead to the broker.
        return seen_brokers(consumer._client), own_tcp_peers()

    run = produce_denied_then_consume(address, topic, "not-allowed", b"g", inspect)
    got, denied_after, (learned, peers) = asyncio.run(asyncio.wait_for(run, 60))
    assert got == [b"g%d" % i for i in range(5)]
    assert learned == {("127.0.0.1", gateway.port)}
    assert ("127.0.0.1", gateway.port) in peers
    assert (gateway.broker_host, gateway.broker_port) not in peers
    assert denied_after < 2.0
    flows = gateway.wait_flows_until(lambda fl: any(f["verdict"] == "DROPPED" for f in fl))
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


def test_wildcard_listener_advertises_the_configured_host(broker, tmp_path):
    """A listener on 0.0.0.0 advertises --advertise-host (127.0.0.2 here: still loopback, and
    distinct from the broker's 127.0.0.1), and clients follow it."""
    from aiokafka import AIOKafkaProducer

    gw = start_gateway(broker, tmp_path, "kafka", "0.0.0.0", ["--advertise-host", "127.0.0.2"])
    try:

        async def main():
            producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.2:{gw.port}")
            await producer.start()
            try:
                await producer.send_and_wait(gw.topic, b"via wildcard")
                return seen_brokers(producer.client), own_tcp_peers()
            finally:
                await producer.stop()

        learned, peers = asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        gw.stop()
    assert learned == {("127.0.0.2", gw.port)}
    assert (broker.host, broker.port) not in peers
