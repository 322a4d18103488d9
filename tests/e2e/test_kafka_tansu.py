"""The same proxy session against a second, independent broker: Tansu (in-memory storage).
aiokafka produce, group consume and a denied topic; confluent-kafka produce (flexible versions);
a denial of a flexible Produce decoded by kafka-python."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from policies.l7 import KafkaRuleSet
from policies.model import KafkaRule
from tests.e2e.kafka_broker import ProxyThread, TansuBroker, produce_denied_then_consume
from tests.e2e.test_kafka_e2e import CONSUME_KEYS, produce_request, roundtrip

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def tansu():
    b = TansuBroker().start()
    yield b
    b.stop()


@pytest.fixture
def proxy(tansu):
    topic = f"tansu-{uuid.uuid4().hex[:8]}"
    rules = KafkaRuleSet(
        [KafkaRule(api_keys=(0, 3, 18), topic=topic), KafkaRule(api_keys=CONSUME_KEYS, topic=topic)]
    )
    p = ProxyThread((tansu.host, tansu.port), rules=rules, brokers={}).start()
    p.brokers[(tansu.host, tansu.port)] = ("127.0.0.1", p.port)
    p.topic = topic
    yield p
    p.stop()


def test_aiokafka_through_proxy_to_tansu(proxy):
    run = produce_denied_then_consume(proxy.address, proxy.topic, "forbidden", b"t")
    got, denied_after, _ = asyncio.run(asyncio.wait_for(run, 60))
    assert (
        sorted(got) == [b"t%d" % i for i in range(5)] and denied_after < 2.0
    )  # several partitions
    seen = {f["l7"]["kafka"]["api_key"] for f in proxy.flows if f["verdict"] == "FORWARDED"}
    assert {"produce", "fetch", "joingroup", "syncgroup", "offsetcommit"} <= seen


def test_confluent_kafka_flexible_produce_to_tansu(proxy):
    from confluent_kafka import Producer

    results = []
    producer = Producer({"bootstrap.servers": proxy.address})
    for _ in range(3):
        producer.produce(proxy.topic, b"x", on_delivery=lambda err, msg: results.append(err))
    assert producer.flush(30) == 0
    assert results == [None, None, None]
    versions = {f["l7"]["kafka"]["api_version"] for f in proxy.flows
                if f["l7"]["kafka"]["api_key"] == "produce"}  # fmt: skip
    assert versions and min(versions) >= 9  # flexible Produce


def test_flexible_produce_denial_from_tansu_session(proxy):
    resp = roundtrip(proxy.address, produce_request([proxy.topic, "forbidden"], 9), 9, 21)
    assert resp._header.correlation_id == 21
    assert {p.error_code for t in resp.responses for p in t.partition_responses} == {29}


def test_confluent_kafka_consumes_by_topic_id_through_proxy(proxy):
    """librdkafka fetches by topic id (Fetch v13+, v15 through the proxy's version cap) on its
    partition leader's connection, while its Metadata went over the bootstrap connection: the
    proxy resolves the id from what any of its connections learned. With one map per connection
    every Fetch was denied."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    producer = Producer({"bootstrap.servers": proxy.address, "linger.ms": 0})
    for i in range(5):
        producer.produce(proxy.topic, b"r%d" % i, partition=0)
        producer.flush(30)
    consumer = Consumer({"bootstrap.servers": proxy.address, "group.id": "g-" + proxy.topic,
                         "enable.auto.commit": False})  # fmt: skip
    consumer.assign([TopicPartition(proxy.topic, 0, 0)])
    got, deadline = [], time.monotonic() + 20
    while len(got) < 5 and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            got.append(msg.value())
    consumer.close()
    assert got == [b"r%d" % i for i in range(5)]
    fetches = [f for f in proxy.flows if f["l7"]["kafka"]["api_key"] == "fetch"]
    assert fetches and all(f["verdict"] == "FORWARDED" for f in fetches)
    assert max(f["l7"]["kafka"]["api_version"] for f in fetches) >= 13
