"""Kafka through the proxy session against a real broker (noida-db), with aiokafka,
confluent-kafka (librdkafka), kcat and raw kafka-python protocol messages.

One broker per module; each test starts its own proxy (a thread with a uvloop loop) so it can
pick the rule set. Broker addresses in Metadata/FindCoordinator point back at the proxy, as in
gateway mode, so clients never go around it.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import subprocess
import time
import uuid

import pytest

from parsers.kafka.apis import API_TABLE
from parsers.kafka.keys import API_VERSIONS, FETCH, METADATA, PRODUCE
from policies.kafka_keys import ROLES
from policies.l7 import KafkaRuleSet
from policies.model import KafkaRule
from tests.conftest import need_binary
from tests.e2e.kafka_broker import ProxyThread
from tests.unit.kafka.samples import kafka_python_classes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

CONSUME_KEYS = ROLES["consume"]
PRODUCE_KEYS = ROLES["produce"]
REQUESTS, RESPONSES = kafka_python_classes()


@pytest.fixture
def proxy_for(broker):
    started = []

    def start(rules, **kw):
        p = ProxyThread((broker.host, broker.port), rules=rules, brokers={}, **kw).start()
        p.brokers[(broker.host, broker.port)] = ("127.0.0.1", p.port)
        started.append(p)
        return p

    yield start
    for p in started:
        p.stop()


def topic_name(prefix="t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def kafka_flows(proxy, kind="REQUEST"):
    return [f for f in proxy.flows if f["l7"]["type"] == kind]


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- aiokafka ---------------------------------------------------------------------------


def test_aiokafka_produce_and_group_consume(proxy_for):
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    topic = topic_name()
    rules = KafkaRuleSet(
        [
            KafkaRule(api_keys=PRODUCE_KEYS, topic=topic),
            KafkaRule(api_keys=CONSUME_KEYS, topic=topic),
        ]
    )
    proxy = proxy_for(rules)

    async def main():
        producer = AIOKafkaProducer(bootstrap_servers=proxy.address, acks=1)
        await producer.start()
        for i in range(20):
            await producer.send_and_wait(topic, b"m%d" % i)
        await producer.stop()
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=proxy.address, group_id=topic_name("g"),
            auto_offset_reset="earliest", enable_auto_commit=False, heartbeat_interval_ms=100,
        )  # fmt: skip
        await consumer.start()
        got = []
        async for msg in consumer:
            got.append(msg.value)
            if len(got) == 20:
                break
        await consumer.commit()
        await asyncio.sleep(0.5)  # a few heartbeats
        await consumer.stop()
        return got

    assert run(main()) == [b"m%d" % i for i in range(20)]
    seen = {f["l7"]["kafka"]["api_key"] for f in kafka_flows(proxy) if f["verdict"] == "FORWARDED"}
    assert {"produce", "fetch", "joingroup", "syncgroup", "heartbeat", "offsetcommit"} <= seen
    topics = {f["l7"]["kafka"]["topic"] for f in kafka_flows(proxy) if f["l7"]["kafka"]["topic"]}
    assert topics == {topic}
    assert not [f for f in proxy.flows if f["verdict"] != "FORWARDED"]
    metrics = proxy.metrics.render()
    assert 'policy_l7_total{rule="forwarded",proto="kafka"}' in metrics
    assert 'l7proxy_kafka_request_duration_seconds_count{api_key="produce"}' in metrics


def test_aiokafka_denied_topic_fails_fast_with_topic_authorization_failed(proxy_for):
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError

    allowed = topic_name()
    rules = KafkaRuleSet([KafkaRule(api_keys=PRODUCE_KEYS, topic=allowed)])
    proxy = proxy_for(rules)

    async def main():
        producer = AIOKafkaProducer(bootstrap_servers=proxy.address)
        await producer.start()
        try:
            await producer.send_and_wait(allowed, b"ok")
            started = time.monotonic()
            with pytest.raises(TopicAuthorizationFailedError):
                await producer.send_and_wait("secret-topic", b"no")
            return time.monotonic() - started
        finally:
            await producer.stop()

    assert run(main()) < 2.0
    dropped = [f for f in proxy.flows if f["verdict"] == "DROPPED"]
    assert dropped and dropped[0]["l7"]["kafka"]["topic"] == "secret-topic"
    assert dropped[0]["l7"]["kafka"]["error_code"] == 29
    assert dropped[0]["drop_reason_desc"] == "POLICY_DENIED"


def test_all_topics_metadata_is_filtered_to_visible_topics(proxy_for, broker):
    from aiokafka import AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient

    visible, hidden = topic_name("vis"), topic_name("hid")

    async def create():
        producer = AIOKafkaProducer(bootstrap_servers=broker.address)
        await producer.start()
        await producer.send_and_wait(visible, b"x")
        await producer.send_and_wait(hidden, b"x")
        await producer.stop()

    run(create())
    proxy = proxy_for(KafkaRuleSet([KafkaRule(api_keys=(3, 18), topic=visible)]))

    async def list_topics():
        admin = AIOKafkaAdminClient(bootstrap_servers=proxy.address)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    topics = run(list_topics())
    assert visible in topics and hidden not in topics


# ---- raw protocol messages (kafka-python's classes) --------------------------------------


def roundtrip(address: str, request, version: int, correlation_id: int, client_id="raw"):
    host, port = address.rsplit(":", 1)
    request.with_header(correlation_id=correlation_id, client_id=client_id)
    data = request.encode(version=version, header=True, framed=True)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(data)
        size = struct.unpack(">i", _recv(sock, 4))[0]
        payload = _recv(sock, size)
    return RESPONSES[request.API_KEY].decode(payload, version=version, header=True)


def _recv(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def produce_request(topics, version):
    """A kafka-python ProduceRequest (built from a dict through its own decoder)."""
    body = {
        "transactional_id": None, "acks": 1, "timeout_ms": 1000,
        "topic_data": [{"name": t, "partition_data": [{"index": 0, "records": None}]}
                       for t in topics],
    }  # fmt: skip
    out = bytearray()
    API_TABLE[PRODUCE].request_codec(version).encode(out, body)
    return REQUESTS[PRODUCE].decode(bytes(out), version=version)


@pytest.mark.parametrize("version", [7, 9])
def test_produce_to_two_topics_one_denied(proxy_for, version):
    allowed = topic_name()
    proxy = proxy_for(KafkaRuleSet([KafkaRule(api_keys=PRODUCE_KEYS, topic=allowed)]))
    resp = roundtrip(proxy.address, produce_request([allowed, "denied"], version), version, 11)
    assert resp._header.correlation_id == 11
    codes = {(t.name, p.error_code) for t in resp.responses for p in t.partition_responses}
    assert codes == {(allowed, 29), ("denied", 29)}
    dropped = {f["l7"]["kafka"]["topic"] for f in proxy.flows if f["verdict"] == "DROPPED"}
    assert dropped == {allowed, "denied"}


def test_client_id_rule(proxy_for):
    rules = KafkaRuleSet([KafkaRule(client_id="good-client")])
    proxy = proxy_for(rules)
    MetadataRequest = REQUESTS[METADATA]
    ok = roundtrip(proxy.address, MetadataRequest(topics=None), 9, 1, client_id="good-client")
    assert ok.brokers and ok.brokers[0].port == proxy.port  # rewritten to the proxy
    ApiVersionsRequest = REQUESTS[API_VERSIONS]
    bad = roundtrip(proxy.address, ApiVersionsRequest(), 0, 2, client_id="bad-client")
    assert bad.error_code == 31  # CLUSTER_AUTHORIZATION_FAILED


def test_api_version_rule(proxy_for):
    topic = topic_name()
    rules = KafkaRuleSet(
        [KafkaRule(api_keys=(0,), api_version=7, topic=topic), KafkaRule(api_keys=(3, 18))]
    )
    proxy = proxy_for(rules)
    denied = roundtrip(proxy.address, produce_request([topic], 8), 8, 5)
    assert denied.responses[0].partition_responses[0].error_code == 29
    versions = {f["l7"]["kafka"]["api_version"] for f in proxy.flows if f["verdict"] == "DROPPED"}
    assert versions == {8}


def test_oversized_frame_closes_with_flow_and_metric(proxy_for):
    proxy = proxy_for(None, max_frame_bytes=1024)
    host, port = proxy.address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(struct.pack(">i", 4096) + b"\x00" * 64)
        assert sock.recv(10) == b""  # closed, no answer
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not proxy.flows:
        time.sleep(0.05)
    errors = [f for f in proxy.flows if f["verdict"] == "ERROR"]
    assert errors and errors[0]["drop_reason_desc"] == "frame_too_large"
    assert 'l7proxy_kafka_connection_errors_total{reason="frame_too_large"} 1' in (
        proxy.metrics.render()
    )


# ---- confluent-kafka (librdkafka) ----------------------------------------------------------


def test_confluent_kafka_produce_consume_and_denied(proxy_for):
    from confluent_kafka import Consumer, KafkaError, Producer

    topic = topic_name()
    rules = KafkaRuleSet(
        [
            KafkaRule(api_keys=PRODUCE_KEYS, topic=topic),
            KafkaRule(api_keys=CONSUME_KEYS, topic=topic),
        ]
    )
    proxy = proxy_for(rules)
    results = []
    producer = Producer({"bootstrap.servers": proxy.address, "acks": 1, "linger.ms": 5})
    for i in range(10):
        producer.produce(topic, b"c%d" % i, on_delivery=lambda err, msg: results.append(err))
    producer.produce("forbidden", b"x", on_delivery=lambda err, msg: results.append(err))
    started = time.monotonic()
    assert producer.flush(30) == 0
    assert time.monotonic() - started < 10
    assert len(results) == 11 and sum(e is None for e in results) == 10
    denied = [e for e in results if e is not None]
    assert len(denied) == 1 and denied[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED

    consumer = Consumer({
        "bootstrap.servers": proxy.address, "group.id": topic_name("g"),
        "auto.offset.reset": "earliest", "enable.auto.commit": False,
    })  # fmt: skip
    consumer.subscribe([topic])
    got = []
    deadline = time.monotonic() + 30
    while len(got) < 10 and time.monotonic() < deadline:
        msg = consumer.poll(0.5)
        if msg is not None and msg.error() is None:
            got.append(msg.value())
    consumer.commit(asynchronous=False)
    consumer.close()
    assert sorted(got) == sorted(b"c%d" % i for i in range(10))
    seen = {f["l7"]["kafka"]["api_key"] for f in kafka_flows(proxy) if f["verdict"] == "FORWARDED"}
    assert {"produce", "fetch", "joingroup", "syncgroup", "offsetcommit"} <= seen


# ---- kcat -------------------------------------------------------------------------------


def test_kcat_produce_consume_and_denied(proxy_for):
    kcat = need_binary("kcat")
    topic = topic_name()
    rules = KafkaRuleSet(
        [
            KafkaRule(api_keys=PRODUCE_KEYS, topic=topic),
            KafkaRule(api_keys=CONSUME_KEYS, topic=topic),
        ]
    )
    proxy = proxy_for(rules)
    produce = subprocess.run(
        [kcat, "-b", proxy.address, "-P", "-t", topic],
        input=b"k1\nk2\nk3\n", capture_output=True, timeout=30,
    )  # fmt: skip
    assert produce.returncode == 0, produce.stderr
    consume = subprocess.run(
        [kcat, "-b", proxy.address, "-C", "-t", topic, "-o", "beginning", "-e", "-q"],
        capture_output=True, timeout=30,
    )  # fmt: skip
    assert consume.stdout.split() == [b"k1", b"k2", b"k3"]
    started = time.monotonic()
    denied = subprocess.run(
        [kcat, "-b", proxy.address, "-P", "-t", "forbidden"],
        input=b"x\n", capture_output=True, timeout=30,
    )  # fmt: skip
    assert time.monotonic() - started < 15
    assert b"authoriz" in denied.stderr.lower()
    forwarded = {(f["l7"]["kafka"]["api_key"], f["l7"]["kafka"]["topic"])
                 for f in kafka_flows(proxy) if f["verdict"] == "FORWARDED"}  # fmt: skip
    assert {("produce", topic), ("fetch", topic)} <= forwarded


def test_confluent_kafka_fetch_denied_reports_topic_authorization_failed(proxy_for):
    """A topic the client may produce to but not consume: its Fetch is denied. librdkafka must
    see TOPIC_AUTHORIZATION_FAILED on the partition (a consume error), not a response it cannot
    parse: it rejects a null record set ("invalid MessageSetSize -1") and retries for ever."""
    from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

    topic = topic_name()
    every_consume_key_but_fetch = tuple(k for k in CONSUME_KEYS if k != FETCH)
    proxy = proxy_for(KafkaRuleSet([KafkaRule(api_keys=(0, *every_consume_key_but_fetch),
                                              topic=topic)]))  # fmt: skip
    producer = Producer({"bootstrap.servers": proxy.address, "acks": 1})
    producer.produce(topic, b"kept")
    assert producer.flush(30) == 0
    consumer = Consumer({"bootstrap.servers": proxy.address, "group.id": topic_name("g"),
                         "enable.auto.commit": False})  # fmt: skip
    consumer.assign([TopicPartition(topic, 0, 0)])
    codes, got = set(), []
    deadline = time.monotonic() + 10
    while KafkaError.TOPIC_AUTHORIZATION_FAILED not in codes and time.monotonic() < deadline:
        msg = consumer.poll(0.2)
        if msg is not None:
            if msg.error() is None:
                got.append(msg)
            else:
                codes.add(msg.error().code())
    consumer.close()
    assert got == []
    dropped = [f for f in kafka_flows(proxy) if f["verdict"] == "DROPPED"]
    assert {f["l7"]["kafka"]["api_key"] for f in dropped} == {"fetch"}
    assert codes == {KafkaError.TOPIC_AUTHORIZATION_FAILED}


def test_fetch_by_an_id_no_broker_knows_is_denied_after_one_lookup(proxy_for):
    """A Fetch naming a topic id the proxy never saw: it asks the broker (real Metadata v12 on
    its own connection), the broker does not know the id either, so the Fetch is answered with
    TOPIC_AUTHORIZATION_FAILED (fail closed) and the lookup shows in the metric."""
    topic = topic_name()
    proxy = proxy_for(KafkaRuleSet([KafkaRule(api_keys=CONSUME_KEYS, topic=topic)]),
                      shared_topic_ids=False)  # fmt: skip
    body = {"max_wait_ms": 1, "rack_id": "", "topics": [
        {"topic_id": bytes(range(16)), "partitions": [{"partition": 0}]}]}  # fmt: skip
    out = bytearray()
    API_TABLE[FETCH].request_codec(13).encode(out, body)
    resp = roundtrip(proxy.address, REQUESTS[FETCH].decode(bytes(out), version=13), 13, 61)
    assert resp._header.correlation_id == 61
    assert [p.error_code for t in resp.responses for p in t.partitions] == [29]
    assert 'l7proxy_kafka_topic_id_lookups_total{result="not_found"} 1\n' in (
        proxy.metrics.render()
    )
