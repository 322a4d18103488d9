"""The same proxy session against a second, independent broker: Tansu (in-memory storage).
aiokafka produce, group consume and a denied topic; confluent-kafka produce (flexible versions);
a denial of a flexible Produce decoded by kafka-python."""

from __future__ import annotations

import asyncio
import re
import time
import uuid

import pytest

from policies.l7 import KafkaRuleSet
from policies.model import KafkaRule
from tests.e2e.kafka_broker import (
    ProxyThread,
    TansuBroker,
    produce_denied_then_consume,
    start_gateway,
)
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


@pytest.fixture(params=[True, False], ids=["one-map", "map-per-connection"])
def id_proxy(tansu, request):
    topic = f"tansu-{uuid.uuid4().hex[:8]}"
    rules = KafkaRuleSet([KafkaRule(api_keys=(0, *CONSUME_KEYS), topic=topic)])
    p = ProxyThread((tansu.host, tansu.port), rules=rules, brokers={},
                    shared_topic_ids=request.param).start()  # fmt: skip
    p.brokers[(tansu.host, tansu.port)] = ("127.0.0.1", p.port)
    p.topic = topic
    yield p
    p.stop()


def test_confluent_kafka_consumes_by_topic_id_through_proxy(id_proxy):
    """librdkafka fetches by topic id (Fetch v13+, v15 through the proxy's version cap) on its
    partition leader's connection, while its Metadata went over the bootstrap connection.
    one-map: the proxy resolves the id from what any of its connections learned.
    map-per-connection (as when the connections land on different gateway workers): the proxy
    looks the id up with the broker itself. Before either, every Fetch was denied (29)."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    proxy = id_proxy
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
    lookups = re.findall(r'l7proxy_kafka_topic_id_lookups_total\{result="(\w+)"\} (\d+)',
                         proxy.metrics.render())  # fmt: skip
    if proxy.shared_topic_ids:
        assert lookups == []  # learned from the bootstrap connection's Metadata
    else:
        assert lookups and {r for r, n in lookups if int(n)} == {"found"}


def test_topic_id_lookup_with_the_broker(tansu, proxy):
    """The lookup the proxy makes itself (l7proxy.kafka.resolve) against a real broker."""
    from confluent_kafka import Producer

    from l7proxy.kafka.resolve import lookup_topic_ids

    producer = Producer({"bootstrap.servers": tansu.address})
    producer.produce(proxy.topic, b"x")
    assert producer.flush(30) == 0
    ids = asyncio.run(asyncio.wait_for(lookup_topic_ids(tansu.host, tansu.port, 1 << 20), 10))
    assert proxy.topic in ids.values()
    assert all(len(i) == 16 for i in ids)


def test_gateway_with_two_workers_serves_fetch_by_topic_id(tansu, tmp_path):
    """The real `l7proxy gateway --workers 2`: the kernel spreads a client's connections over
    the workers, so librdkafka's Fetch (by topic id) often reaches a worker that never saw the
    Metadata naming the topic. Before the lookup, about one consumer in four got
    TOPIC_AUTHORIZATION_FAILED for an allowed topic."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    gw = start_gateway(tansu, tmp_path, "kafka", extra=("--workers", "2"))
    try:
        address = f"127.0.0.1:{gw.port}"
        producer = Producer({"bootstrap.servers": address, "linger.ms": 0})
        producer.produce(gw.topic, b"w", partition=0)
        assert producer.flush(30) == 0
        for run in range(10):
            consumer = Consumer({"bootstrap.servers": address, "group.id": f"g{run}",
                                 "enable.auto.commit": False})  # fmt: skip
            consumer.assign([TopicPartition(gw.topic, 0, 0)])
            got, errors, deadline = None, [], time.monotonic() + 10
            while got is None and time.monotonic() < deadline:
                msg = consumer.poll(0.2)
                if msg is not None:
                    if msg.error() is None:
                        got = msg.value()
                    else:
                        errors.append(msg.error().code())
            consumer.close()
            assert (got, errors) == (b"w", []), f"consumer {run}"
    finally:
        gw.stop()
