"""The same proxy session against a second, independent broker: Tansu (in-memory storage).
aiokafka produce, group consume and a denied topic; confluent-kafka produce (flexible versions);
a denial of a flexible Produce decoded by kafka-python."""

from __future__ import annotations

import asyncio
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
