"""A consumer denied its topic gets the authorization error promptly and does not spin (issue 19):
aiokafka and confluent-kafka (librdkafka) through the real `l7proxy gateway` to a real broker
(noida-db), counting the Metadata requests for the denied topic in the gateway's flow log.

What a denied topic looks like to a client is a Metadata answer with TOPIC_AUTHORIZATION_FAILED
(29) and no partitions, as Apache Kafka's broker sends for a topic the client may not Describe
(byte for byte: tests/unit/kafka/test_metadata_denial_shape.py). aiokafka raises
TopicAuthorizationFailedError for it where it waits for a topic's metadata (a consumer given its
topics, a producer); a consumer that `assign()`s a partition of such a topic instead re-asks
Metadata in a loop with no backoff until its caller gives up, against a broker just the same
(its fetcher sees "no leader" and forces a metadata update each turn): the demo's old consumer.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from tests.e2e.kafka_broker import start_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture
def gateway(broker, tmp_path):
    """The gateway allows produce and consume on `gw.topic` only; `gw.denied` exists on the
    broker (written there directly), as deathstar-plans does in the demo."""
    gw = start_gateway(broker, tmp_path, "kafka")
    gw.denied = f"denied-{uuid.uuid4().hex[:8]}"
    asyncio.run(asyncio.wait_for(_produce(broker.address, gw.denied, b"plans"), 30))
    yield gw
    gw.stop()


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


def metadata_requests_for(flows: list[dict], topic: str) -> int:
    """Metadata requests naming `topic` that the gateway denied (one flow per denied topic)."""
    return sum(
        1
        for f in flows
        if f["verdict"] == "DROPPED"
        and f.get("l7", {}).get("kafka", {}).get("api_key") == "metadata"
        and f["l7"]["kafka"]["topic"] == topic
    )


def test_aiokafka_consumer_given_its_topic_gets_the_error_at_start(gateway):
    """The usage that reports a denial: the topic given to the consumer (no group needed).
    start() waits for the topic's metadata and raises at the first answer with 29."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import TopicAuthorizationFailedError

    address = f"127.0.0.1:{gateway.port}"

    async def consume(topic: str) -> list[bytes]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=address, request_timeout_ms=5000,
                                    auto_offset_reset="earliest", enable_auto_commit=False)  # fmt: skip
        await consumer.start()
        try:
            batch = await consumer.getmany(timeout_ms=3000)
            return [m.value for records in batch.values() for m in records]
        finally:
            await consumer.stop()

    asyncio.run(asyncio.wait_for(_produce(address, gateway.topic, b"announce"), 30))
    assert asyncio.run(asyncio.wait_for(consume(gateway.topic), 30)) == [b"announce"]
    started = time.monotonic()
    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(asyncio.wait_for(consume(gateway.denied), 10))
    assert time.monotonic() - started < 2.0
    time.sleep(1.0)  # anything still asking would show up now
    flows = gateway.wait_flows_until(lambda fl: metadata_requests_for(fl, gateway.denied) > 0)
    assert 1 <= metadata_requests_for(flows, gateway.denied) <= 3


def test_confluent_kafka_consumer_gets_the_error_and_backs_off(gateway):
    """librdkafka reports a subscribed topic's TOPIC_AUTHORIZATION_FAILED to the application as
    a consumer error and refreshes the topic's metadata on its own backoff, not in a loop."""
    from confluent_kafka import Consumer, KafkaError

    consumer = Consumer({
        "bootstrap.servers": f"127.0.0.1:{gateway.port}", "group.id": f"g-{gateway.denied}",
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })  # fmt: skip
    consumer.subscribe([gateway.denied])
    started = time.monotonic()
    codes, got = set(), []
    try:
        while time.monotonic() - started < 10:
            msg = consumer.poll(0.1)
            if msg is None:
                continue
            if msg.error() is None:
                got.append(msg.value())
            else:
                codes.add(msg.error().code())
                if msg.error().code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                    break
        reported_after = time.monotonic() - started
        # Keep polling as an application would: it must not turn into a Metadata storm.
        while time.monotonic() - started < reported_after + 3:
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None:
                got.append(msg.value())
    finally:
        consumer.close()
    assert got == []
    assert KafkaError.TOPIC_AUTHORIZATION_FAILED in codes
    assert reported_after < 3.0
    flows = gateway.wait_flows_until(lambda fl: metadata_requests_for(fl, gateway.denied) > 0)
    asked = metadata_requests_for(flows, gateway.denied)
    assert 1 <= asked <= 10, asked  # 1 in a 10 s run; the old demo consumer sent 2,146 in 4 s
