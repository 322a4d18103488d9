"""The proxy's Metadata answer for a denied topic is what an Apache Kafka broker sends for a topic
the client may not Describe (KafkaApis: error TOPIC_AUTHORIZATION_FAILED, is_internal false, no
partitions, a zero topic id unless the client asked by id, authorized operations left at
INT32_MIN, after the authorized topics), with the broker's own broker list, at every version.
Decoded with kafka-python's classes, not the proxy's codec."""

from __future__ import annotations

import uuid

import pytest

from l7proxy.kafka.topic_ids import TopicIdMap
from parsers.kafka.apis import API_TABLE
from policies.l7 import KafkaRuleSet
from policies.model import KafkaRule
from tests.unit.kafka.samples import kafka_python_classes
from tests.unit.kafka.test_layer import ToClient, ToUpstream, layer, of, request, response

_, RESPONSES = kafka_python_classes()
CONSUME_T1 = KafkaRuleSet([KafkaRule(api_keys=(1, 2, 3, 18), topic="t1")])
BROKERS = [("127.0.0.1", 9092), ("127.0.0.2", 9093)]
SECRET_ID = bytes(range(1, 17))
ZERO_ID = bytes(16)


def _broker_answer(version: int, topics: list[str]) -> bytes:
    """What the broker answers for the topics the proxy forwarded."""
    return response(3, version, 7, {
        "brokers": [{"node_id": i, "host": h, "port": p} for i, (h, p) in enumerate(BROKERS)],
        "controller_id": 0,
        "topics": [{"name": t, "topic_id": bytes([9]) * 16,
                    "partitions": [{"partition_index": 0, "leader_id": 0}]} for t in topics],
    })  # fmt: skip


def _ask(version: int, topics: list[dict]):
    """The client's Metadata through the layer; returns (what went upstream, the answer)."""
    lay = layer(CONSUME_T1, TopicIdMap({SECRET_ID: "secret"}))
    body = {"topics": topics, "allow_auto_topic_creation": True}
    (up,) = of(ToUpstream, lay.client_data(request(3, version, 7, body)))
    head = 4 + 2 + 2 + 4 + 2 + 3 + (1 if API_TABLE[3].flexible(version) else 0)
    sent = API_TABLE[3].request_codec(version).decode(memoryview(up.data), head)[0]
    # A v0 broker answers an empty list with every topic it has.
    names = [t["name"] for t in sent["topics"]]
    if version == 0 and not names:
        names = ["t1", "other", "secret"]
    out = lay.upstream_data(_broker_answer(version, names))
    answer = b"".join(bytes(c.data) for c in of(ToClient, out))
    return sent, RESPONSES[3].decode(answer[4:], version=version, header=True).to_dict()


def _check_denied(topic: dict, version: int, name, topic_id=ZERO_ID) -> None:
    assert topic["error_code"] == 29
    assert topic["name"] == name
    assert topic["partitions"] == []
    if version >= 1:
        assert topic["is_internal"] is False
    if version >= 10:
        # kafka-python shows a zero id as None, others as their UUID text
        assert topic["topic_id"] == (
            None if topic_id == ZERO_ID else str(uuid.UUID(bytes=topic_id))
        )
    if version >= 8:
        assert topic["authorized_operations"] is None  # kafka-python's reading of INT32_MIN


@pytest.mark.parametrize("version", range(0, API_TABLE[3].versions[1] + 1))
def test_a_denied_topic_next_to_an_allowed_one(version):
    sent, answer = _ask(version, [{"name": "t1"}, {"name": "secret"}])
    assert [t["name"] for t in sent["topics"]] == ["t1"]  # the denied name never reaches it
    assert [(b["host"], b["port"]) for b in answer["brokers"]] == BROKERS
    allowed, denied = answer["topics"]
    assert (allowed["name"], allowed["error_code"]) == ("t1", 0)
    _check_denied(denied, version, "secret")


@pytest.mark.parametrize("version", range(0, API_TABLE[3].versions[1] + 1))
def test_only_denied_topics_still_carry_the_brokers(version):
    """The demo's denied consumer asks for its one topic. The answer must list the brokers as a
    broker's does: aiokafka ignores a Metadata answer without brokers (and asks again until its
    request timeout instead of raising TopicAuthorizationFailedError). v0 reads an empty topic
    list as "all topics": the proxy asks for all of them and shows none."""
    sent, answer = _ask(version, [{"name": "secret"}])
    assert sent["topics"] == []  # v0: all topics, none of them shown
    assert [(b["host"], b["port"]) for b in answer["brokers"]] == BROKERS
    (denied,) = answer["topics"]
    _check_denied(denied, version, "secret")


@pytest.mark.parametrize("version", range(12, API_TABLE[3].versions[1] + 1))
def test_a_topic_asked_for_by_id_comes_back_by_id(version):
    """By id (v12+): a broker answers a null name and the id (ids are not secret)."""
    _, answer = _ask(version, [{"name": None, "topic_id": SECRET_ID}])
    (denied,) = answer["topics"]
    _check_denied(denied, version, None, SECRET_ID)
