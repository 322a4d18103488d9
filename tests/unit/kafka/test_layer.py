"""KafkaLayer playbooks: bytes in, commands out, no sockets."""

from __future__ import annotations

import struct

import pytest

from l7proxy.kafka.layer import (
    Close,
    KafkaLayer,
    KafkaSettings,
    Record,
    ResolveTopicIds,
    ToClient,
    ToUpstream,
)
from l7proxy.kafka.topic_ids import TopicIdMap
from parsers.kafka.apis import API_TABLE
from parsers.kafka.frames import encode_response_header, frame
from policies.l7 import KafkaRuleSet
from policies.model import KafkaRule
from tests.unit.kafka.samples import kafka_python_classes

_, RESPONSES = kafka_python_classes()
# role=produce, topic=t1: Metadata and ApiVersions naming no topic pass, t1 is the only topic.
PRODUCE_ONLY_T1 = KafkaRuleSet([KafkaRule(api_keys=(0, 3, 18), topic="t1")])


def request(key, version, cid, body, client_id="app"):
    spec = API_TABLE[key]
    cid_bytes = client_id.encode()
    out = bytearray(struct.pack(">hhih", key, version, cid, len(cid_bytes)) + cid_bytes)
    if spec.flexible(version):
        out.append(0)
    spec.request_codec(version).encode(out, body)
    return frame(out)


def response(key, version, cid, body):
    spec = API_TABLE[key]
    out = bytearray(encode_response_header(cid, key, spec.flexible(version)))
    spec.response_codec(version).encode(out, body)
    return frame(out)


def produce(topics, acks=1):
    return {
        "acks": acks,
        "timeout_ms": 1000,
        "topic_data": [
            {"name": t, "partition_data": [{"index": 0, "records": b"R" * 100}]} for t in topics
        ],
    }


def layer(rules=PRODUCE_ONLY_T1, topic_ids=None, **kw):
    return KafkaLayer(
        lambda: rules, KafkaSettings(**kw), iter(range(0, 10**12, 1000)).__next__, topic_ids
    )


def of(kind, commands):
    return [c for c in commands if isinstance(c, kind)]


def test_allowed_produce_is_forwarded_byte_for_byte():
    lay = layer()
    raw = request(0, 9, 1, produce(["t1"]))
    out = lay.client_data(raw)
    assert of(ToUpstream, out) == [ToUpstream(raw)]
    (rec,) = of(Record, out)
    assert (rec.verdict, rec.topic, rec.api_key, rec.api_version) == ("FORWARDED", "t1", 0, 9)


def test_produce_to_two_topics_one_denied_answers_29_for_every_partition():
    for version in (3, 8, 9, 11):
        lay = layer()
        out = lay.client_data(request(0, version, 7, produce(["t1", "secret"])))
        assert not of(ToUpstream, out)
        (answer,) = of(ToClient, out)
        decoded = RESPONSES[0].decode(answer.data[4:], version=version, header=True)
        assert decoded._header.correlation_id == 7
        codes = {(t.name, p.error_code) for t in decoded.responses for p in t.partition_responses}
        assert codes == {("t1", 29), ("secret", 29)}
        assert {(r.topic, r.verdict) for r in of(Record, out)} == {
            ("t1", "DROPPED"),
            ("secret", "DROPPED"),
        }


def test_denial_waits_behind_earlier_forwarded_requests():
    lay = layer()
    allowed = request(0, 9, 1, produce(["t1"]))
    denied = request(0, 9, 2, produce(["secret"]))
    out = lay.client_data(allowed + denied)
    assert len(of(ToUpstream, out)) == 1 and not of(ToClient, out)
    resp = response(0, 9, 1, {"responses": []})
    out = lay.upstream_data(resp[:3]) + lay.upstream_data(resp[3:])
    sent = b"".join(bytes(c.data) for c in of(ToClient, out))
    assert sent.startswith(resp)
    assert struct.unpack(">i", sent[len(resp) + 4 : len(resp) + 8])[0] == 2
    latency = [r for r in of(Record, out) if r.kind == "RESPONSE"]
    assert latency and latency[0].latency_ns > 0


def test_responses_stream_through_in_pieces():
    lay = layer(rules=None)
    lay.client_data(request(1, 11, 5, {"topics": [], "rack_id": ""}))
    big = response(1, 11, 5, {"responses": [{"topic": "t1", "partitions": [
        {"partition_index": 0, "records": b"x" * 50_000}]}]})  # fmt: skip
    out = []
    for i in range(0, len(big), 4096):
        out += lay.upstream_data(big[i : i + 4096])
    assert b"".join(bytes(c.data) for c in of(ToClient, out)) == big
    assert lay.in_flight == 0


def test_acks_zero_denied_closes_instead_of_answering():
    lay = layer()
    out = lay.client_data(request(0, 9, 3, produce(["secret"], acks=0)))
    assert of(Close, out) and not of(ToClient, out)


def test_acks_zero_allowed_expects_no_response():
    lay = layer()
    lay.client_data(request(0, 9, 3, produce(["t1"], acks=0)))
    assert lay.in_flight == 0


def test_api_key_rule_denies_group_api_with_30():
    lay = layer()
    out = lay.client_data(
        request(12, 4, 9, {"group_id": "g", "generation_id": 1, "member_id": "m"})
    )
    (answer,) = of(ToClient, out)
    decoded = RESPONSES[12].decode(answer.data[4:], version=4, header=True)
    assert decoded.error_code == 30


def test_client_id_and_api_version_rules():
    rules = KafkaRuleSet([KafkaRule(api_keys=(0,), client_id="good", api_version=9)])
    ok = layer(rules).client_data(request(0, 9, 1, produce(["t"]), client_id="good"))
    assert of(ToUpstream, ok)
    for client, version in (("bad", 9), ("good", 8)):
        out = layer(rules).client_data(request(0, version, 1, produce(["t"]), client_id=client))
        assert not of(ToUpstream, out) and of(ToClient, out)


def test_oversized_and_negative_frames_close_with_a_record():
    for data, reason in ((struct.pack(">i", 1 << 20), "frame_too_large"),
                         (struct.pack(">i", -1), "negative_frame_size")):  # fmt: skip
        out = layer(max_frame_size=1024).client_data(data)
        (close,) = of(Close, out)
        assert close.reason == reason
        assert of(Record, out)[0].verdict == "ERROR"


def _metadata_response(version, topics, brokers=(("127.0.0.1", 9092),)):
    return response(3, version, 4, {
        "brokers": [{"node_id": i, "host": h, "port": p} for i, (h, p) in enumerate(brokers)],
        "controller_id": 0,
        "topics": [{"name": t, "topic_id": bytes([i + 1]) * 16,
                    "partitions": [{"partition_index": 0, "leader_id": 0}]}
                   for i, t in enumerate(topics)],
    })  # fmt: skip


def test_metadata_all_topics_filtered_and_brokers_rewritten():
    lay = layer(brokers={("127.0.0.1", 9092): ("10.0.0.9", 19092)})
    out = lay.client_data(request(3, 12, 4, {"topics": None}))
    assert of(ToUpstream, out)
    out = lay.upstream_data(_metadata_response(12, ["t1", "secret"]))
    data = b"".join(bytes(c.data) for c in of(ToClient, out))
    decoded = RESPONSES[3].decode(data[4:], version=12, header=True)
    assert [t.name for t in decoded.topics] == ["t1"]
    assert [(b.host, b.port) for b in decoded.brokers] == [("10.0.0.9", 19092)]
    # Hidden topics' ids are learned too: asked for by id, they are denied by name.
    assert lay.topic_names == {bytes([1]) * 16: "t1", bytes([2]) * 16: "secret"}


def test_metadata_named_topics_forwards_allowed_and_answers_denied():
    lay = layer()
    out = lay.client_data(request(3, 9, 4, {"topics": [{"name": "t1"}, {"name": "secret"}]}))
    (up,) = of(ToUpstream, out)
    sent = API_TABLE[3].request_codec(9).decode(memoryview(up.data), 4 + 2 + 2 + 4 + 2 + 3 + 1)[0]
    assert [t["name"] for t in sent["topics"]] == ["t1"]
    out = lay.upstream_data(_metadata_response(9, ["t1"]))
    data = b"".join(bytes(c.data) for c in of(ToClient, out))
    decoded = RESPONSES[3].decode(data[4:], version=9, header=True)
    assert {(t.name, t.error_code) for t in decoded.topics} == {("t1", 0), ("secret", 29)}


def test_fetch_by_topic_id_resolves_through_metadata():
    lay = layer(KafkaRuleSet([KafkaRule(api_keys=(1, 3, 18), topic="t1")]))
    lay.client_data(request(3, 12, 4, {"topics": None}))
    lay.upstream_data(_metadata_response(12, ["t1", "secret"]))

    def fetch(topic_id):
        return request(1, 13, 8, {"max_wait_ms": 1, "topics": [
            {"topic_id": topic_id, "partitions": [{"partition": 0}]}], "rack_id": ""})  # fmt: skip

    assert of(ToUpstream, layer(None).client_data(fetch(bytes([1]) * 16)))
    denied = lay.client_data(fetch(bytes([2]) * 16))
    # "secret" was filtered out of Metadata, but its id resolves and the name is denied: 29.
    (answer,) = of(ToClient, denied)
    decoded = RESPONSES[1].decode(answer.data[4:], version=13, header=True)
    assert decoded.responses[0].partitions[0].error_code == 29
    assert of(ToUpstream, lay.client_data(fetch(bytes([1]) * 16)))


def test_api_versions_capped_to_what_the_proxy_parses():
    lay = layer(rules=None, brokers={("h", 1): ("g", 2)})
    lay.client_data(
        request(18, 3, 1, {"client_software_name": "x", "client_software_version": "1"})
    )
    advertised = [
        {"api_key": 0, "min_version": 0, "max_version": 99},
        {"api_key": 1, "min_version": 0, "max_version": 99},
        {"api_key": 999, "min_version": 0, "max_version": 1},
    ]
    out = lay.upstream_data(response(18, 3, 1, {"api_keys": advertised}))
    data = b"".join(bytes(c.data) for c in of(ToClient, out))
    decoded = RESPONSES[18].decode(data[4:], version=3, header=True)
    got = {k.api_key: (k.min_version, k.max_version) for k in decoded.api_keys}
    # A gateway caps Produce/Fetch below the versions that carry broker endpoints (KIP-951).
    assert got == {0: (0, 9), 1: (0, 15)}


def test_unknown_api_with_restrictive_policy_closes():
    raw = frame(struct.pack(">hhih", 90, 0, 1, 0))
    out = layer().client_data(raw)
    assert of(Close, out)[0].reason == "unsupported_api"
    assert of(ToUpstream, layer(rules=None).client_data(raw))


def test_upstream_correlation_mismatch_closes():
    lay = layer(rules=None)
    lay.client_data(request(12, 4, 1, {"group_id": "g", "generation_id": 1, "member_id": "m"}))
    out = lay.upstream_data(response(12, 4, 99, {}))
    assert of(Close, out)[0].reason == "correlation_mismatch"


def test_many_small_responses_in_one_read_go_out_as_one_write():
    lay = layer(rules=None)
    for cid in range(1, 6):
        lay.client_data(
            request(12, 4, cid, {"group_id": "g", "generation_id": 1, "member_id": "m"})
        )
    data = b"".join(response(12, 4, cid, {}) for cid in range(1, 6))
    out = lay.upstream_data(data)
    (write,) = of(ToClient, out)
    assert bytes(write.data) == data
    assert len([r for r in of(Record, out) if r.kind == "RESPONSE"]) == 5


def test_any_split_of_mixed_responses_gives_the_same_bytes():
    """Streamed (Produce), rewritten (Metadata) and synthesised (denied) answers, in order,
    whatever the read boundaries."""
    import random

    rnd = random.Random(6)
    for _ in range(30):
        lay = layer()
        lay.client_data(request(3, 9, 4, {"topics": None}))
        lay.client_data(request(0, 9, 2, produce(["t1"])))
        out = lay.client_data(request(0, 9, 3, produce(["secret"])))
        assert not of(ToClient, out)  # the denial waits for responses 1 and 2
        meta = _metadata_response(9, ["t1"])
        prod = response(0, 9, 2, {"responses": []})
        stream = meta + prod
        cuts = sorted(rnd.sample(range(1, len(stream)), 5))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        got = b"".join(bytes(c.data) for p in pieces for c in of(ToClient, lay.upstream_data(p)))
        assert got.startswith(meta) and got[len(meta) : len(meta) + len(prod)] == prod
        tail = got[len(meta) + len(prod) :]
        assert struct.unpack(">i", tail[4:8])[0] == 3 and lay.in_flight == 0


def test_response_error_codes_are_recorded_and_bytes_untouched():
    lay = layer(rules=None)
    lay.client_data(request(0, 9, 1, produce(["t1"])))
    resp = response(0, 9, 1, {"responses": [{"name": "t1", "partition_responses": [
        {"index": 0, "error_code": 6}]}]})  # fmt: skip
    out = lay.upstream_data(resp[:10]) + lay.upstream_data(resp[10:])
    assert b"".join(bytes(c.data) for c in of(ToClient, out)) == resp
    (done,) = [r for r in of(Record, out) if r.kind == "RESPONSE"]
    assert done.error_code == 6  # NOT_LEADER_OR_FOLLOWER, seen by the proxy


def _big_produce(topics, cid, version=9):
    body = {
        "acks": 1,
        "timeout_ms": 1000,
        "topic_data": [
            {"name": t, "partition_data": [{"index": 0, "records": b"R" * 200_000}]} for t in topics
        ],
    }
    return request(0, version, cid, body)  # fmt: skip


def test_large_allowed_produce_is_cut_through_before_its_last_byte():
    for version in (3, 9):
        lay = layer()
        big = _big_produce(["t1"], 1, version)
        nxt = request(0, version, 2, produce(["t1"]))
        stream = big + nxt
        sent = []
        for i in range(0, len(stream), 65536):
            out = lay.client_data(stream[i : i + 65536])
            sent.append(b"".join(bytes(c.data) for c in of(ToUpstream, out)))
        assert sent[0]  # the first read of a 200 KB frame already flows upstream
        assert b"".join(sent) == stream  # byte for byte, the next frame parsed as usual
        assert lay.in_flight == 2


def test_large_denied_or_multi_topic_produce_waits_for_the_whole_frame():
    lay = layer()
    big = _big_produce(["secret"], 1)
    outs = [lay.client_data(big[i : i + 65536]) for i in range(0, len(big), 65536)]
    assert not any(of(ToUpstream, o) for o in outs)
    (answer,) = of(ToClient, outs[-1])
    decoded = RESPONSES[0].decode(answer.data[4:], version=9, header=True)
    assert decoded.responses[0].partition_responses[0].error_code == 29
    lay = layer()
    two = _big_produce(["t1", "secret"], 2)
    outs = [lay.client_data(two[i : i + 65536]) for i in range(0, len(two), 65536)]
    assert not any(of(ToUpstream, o) for o in outs) and of(ToClient, outs[-1])


def test_offset_fetch_for_all_topics_is_filtered_to_visible_topics():
    rules = KafkaRuleSet([KafkaRule(api_keys=(3, 9), topic="t1")])

    def committed(names):
        return [{"name": n, "partitions": [{"partition_index": 0, "committed_offset": 5}]}
                for n in names]  # fmt: skip

    # v3: a null topic list; v8: the multi-group form with a null topic list for the group.
    for version, req, resp in (
        (3, {"group_id": "g", "topics": None}, {"topics": committed(["t1", "secret"])}),
        (8, {"groups": [{"group_id": "g", "topics": None}]},
         {"groups": [{"group_id": "g", "topics": committed(["t1", "secret"])}]}),
    ):  # fmt: skip
        lay = layer(rules)
        assert of(ToUpstream, lay.client_data(request(9, version, 5, req)))
        out = lay.upstream_data(response(9, version, 5, resp))
        data = b"".join(bytes(c.data) for c in of(ToClient, out))
        decoded = RESPONSES[9].decode(data[4:], version=version, header=True)
        topics = decoded.topics if version < 8 else decoded.groups[0].topics
        assert [t.name for t in topics] == ["t1"]


def test_consumer_group_heartbeat_topics_and_regex():
    rules = KafkaRuleSet([KafkaRule(api_keys=(68,), topic="t1")])
    base = {"group_id": "g", "member_id": "m", "member_epoch": 0}
    ok = layer(rules).client_data(request(68, 1, 1, {**base, "subscribed_topic_names": ["t1"]}))
    assert of(ToUpstream, ok)
    for extra in ({"subscribed_topic_names": ["t1", "secret"]}, {"subscribed_topic_regex": "t.*"}):
        out = layer(rules).client_data(request(68, 1, 1, {**base, **extra}))
        (answer,) = of(ToClient, out)
        # ConsumerGroupHeartbeat: flexible, top-level error code; the topic check gives 29.
        spec = API_TABLE[68]
        value, _ = spec.response_codec(1).decode(memoryview(answer.data), 4 + 4 + 1)
        assert value["error_code"] == 29


def test_topic_ids_learned_on_one_connection_resolve_on_another():
    shared = TopicIdMap()
    rules = KafkaRuleSet([KafkaRule(api_keys=(1, 3, 18), topic="t1")])
    meta_conn = layer(rules, topic_ids=shared)
    meta_conn.client_data(request(3, 12, 4, {"topics": None}))
    meta_conn.upstream_data(_metadata_response(12, ["t1"]))
    fetch_conn = layer(rules, topic_ids=shared)
    fetch = request(1, 13, 8, {"max_wait_ms": 1, "rack_id": "", "topics": [
        {"topic_id": bytes([1]) * 16, "partitions": [{"partition": 0}]}]})  # fmt: skip
    assert of(ToUpstream, fetch_conn.client_data(fetch))
    # Its own map: the id is unknown there; the broker is asked, and when the lookup found
    # nothing the request fails closed.
    alone = layer(rules)
    assert of(ResolveTopicIds, alone.client_data(fetch)) == [ResolveTopicIds((bytes([1]) * 16,))]
    out = alone.topic_ids_resolved()
    assert of(ToClient, out) and not of(ToUpstream, out)


T1_ID, T2_ID = bytes([1]) * 16, bytes([2]) * 16


def _fetch_by_id(cid, topic_id=T1_ID):
    return request(1, 13, cid, {"max_wait_ms": 1, "rack_id": "", "topics": [
        {"topic_id": topic_id, "partitions": [{"partition": 0}]}]})  # fmt: skip


def _upstream_bytes(out):
    return b"".join(bytes(c.data) for c in of(ToUpstream, out))


def test_unknown_topic_id_waits_for_the_lookup_and_so_do_the_requests_behind_it():
    rules = KafkaRuleSet([KafkaRule(api_keys=(1, 3, 18), topic="t1")])
    lay = layer(rules)
    first, second, third = _fetch_by_id(1), _fetch_by_id(2), _fetch_by_id(3)
    # Two frames in one read, then the third and half of a fourth in later reads: none of
    # them may go upstream before the first is decided.
    out = lay.client_data(first + second)
    assert of(ResolveTopicIds, out) and not of(ToUpstream, out) and not of(ToClient, out)
    assert lay.in_flight == 1  # owed an answer: an idle timeout or a drain must not close now
    assert lay.client_data(third) == []
    fourth = _fetch_by_id(4)
    assert lay.client_data(fourth[:10]) == []
    lay.topic_names[T1_ID] = "t1"  # what the session learned from the broker
    out = lay.topic_ids_resolved()
    assert _upstream_bytes(out) == first + second + third
    assert not of(ResolveTopicIds, out)
    assert _upstream_bytes(lay.client_data(fourth[10:])) == fourth
    assert lay.topic_ids_resolved() == []  # nothing waits any more


def test_a_looked_up_id_that_names_a_denied_topic_is_denied_by_name():
    rules = KafkaRuleSet([KafkaRule(api_keys=(1, 3, 18), topic="t1")])
    lay = layer(rules)
    assert of(ResolveTopicIds, lay.client_data(_fetch_by_id(5, T2_ID)))
    lay.topic_names[T2_ID] = "secret"
    out = lay.topic_ids_resolved()
    assert not of(ToUpstream, out)
    denied = [r for r in of(Record, out) if r.verdict == "DROPPED"]
    assert [r.topic for r in denied] == ["secret"]
    assert of(ToClient, out)


def test_an_id_the_broker_did_not_know_is_not_looked_up_again_at_once():
    """A client naming a bogus id in every request makes the proxy ask the broker once per
    second per connection, not once per request."""
    clock = {"now": 0}
    rules = KafkaRuleSet([KafkaRule(api_keys=(1, 3, 18), topic="t1")])
    lay = KafkaLayer(lambda: rules, KafkaSettings(), lambda: clock["now"])
    assert of(ResolveTopicIds, lay.client_data(_fetch_by_id(1, T2_ID)))
    assert of(ToClient, lay.topic_ids_resolved())  # not found: denied
    out = lay.client_data(_fetch_by_id(2, T2_ID))
    assert of(ToClient, out) and not of(ResolveTopicIds, out)
    clock["now"] += 2_000_000_000
    assert of(ResolveTopicIds, lay.client_data(_fetch_by_id(3, T2_ID)))


def test_policy_change_closes_a_fetch_session_holding_a_now_denied_topic():
    current = {"rules": KafkaRuleSet([KafkaRule(api_keys=(1,), topic="t1"),
                                      KafkaRule(api_keys=(1,), topic="t2")])}  # fmt: skip
    lay = KafkaLayer(lambda: current["rules"], KafkaSettings())

    def fetch(topics, cid):
        return request(1, 11, cid, {"max_wait_ms": 1, "session_id": 0, "session_epoch": 0,
                                    "rack_id": "", "topics": [
            {"topic": t, "partitions": [{"partition": 0}]} for t in topics]})  # fmt: skip

    assert of(ToUpstream, lay.client_data(fetch(["t1", "t2"], 1)))
    lay.upstream_data(response(1, 11, 1, {"responses": []}))
    assert of(ToUpstream, lay.client_data(fetch([], 2)))  # incremental: names nothing
    lay.upstream_data(response(1, 11, 2, {"responses": []}))
    current["rules"] = KafkaRuleSet([KafkaRule(api_keys=(1,), topic="t1")])  # reload: t2 denied
    out = lay.client_data(fetch([], 3))
    assert of(Close, out)[0].reason == "fetch_session_denied" and not of(ToUpstream, out)


def test_api_versions_newer_than_parsed_gets_unsupported_version_in_v0():
    """A client opening with a future ApiVersions version is told the range and retries."""
    newest = API_TABLE[18].versions[1]
    for rules in (None, PRODUCE_ONLY_T1):
        lay = layer(rules)
        raw = frame(struct.pack(">hhih", 18, newest + 1, 3, 3) + b"cli" + b"\x00" + b"\x01\x01\x00")
        out = lay.client_data(raw)
        assert not of(ToUpstream, out) and not of(Close, out)
        (answer,) = of(ToClient, out)
        decoded = RESPONSES[18].decode(answer.data[4:], version=0, header=True)
        assert decoded._header.correlation_id == 3 and decoded.error_code == 35
        assert [(k.api_key, k.max_version) for k in decoded.api_keys] == [(18, newest)]
        assert not lay.closed


def _fetch_in_session(cid, version, session_id, epoch):
    return request(1, version, cid, {"max_wait_ms": 1, "rack_id": "", "session_id": session_id,
                                     "session_epoch": epoch, "topics": [
        {"topic": "t1", "partitions": [{"partition": 0}]}]})  # fmt: skip


def _fetch_answer(version, cid, session_id, error_code=0):
    return response(1, version, cid, {"error_code": error_code, "session_id": session_id,
                                      "responses": [{"topic": "t1", "partitions": [
        {"partition_index": 0, "records": b"R" * 3000}]}]})  # fmt: skip


FETCH_T1 = KafkaRuleSet([KafkaRule(api_keys=(1, 3, 18), topic="t1")])


@pytest.mark.parametrize("version", [7, 11, 12, 15])
def test_an_incremental_fetch_needs_a_session_opened_on_this_connection(version):
    """The session id comes from the answer to the Fetch that opened it (read as the answer
    streams by, here cut at every byte of its head); an incremental Fetch of any other session
    is answered FETCH_SESSION_ID_NOT_FOUND and never reaches the broker."""
    answer = _fetch_answer(version, 1, 77)
    for cut in range(1, 40):
        lay = layer(FETCH_T1)
        assert of(ToUpstream, lay.client_data(_fetch_in_session(1, version, 0, 0)))
        out = lay.upstream_data(answer[:cut]) + lay.upstream_data(answer[cut:])
        assert b"".join(bytes(c.data) for c in of(ToClient, out)) == answer
        incremental = _fetch_in_session(2, version, 77, 1)
        assert _upstream_bytes(lay.client_data(incremental)) == incremental, cut
        other = lay.client_data(_fetch_in_session(3, version, 78, 1))
        assert not of(ToUpstream, other)
    # The answer waits its turn behind the forwarded incremental Fetch's.
    answer_70 = of(ToClient, lay.upstream_data(_fetch_answer(version, 2, 77)))[-1]
    decoded = RESPONSES[1].decode(bytes(answer_70.data)[4:], version=version, header=True)
    assert decoded._header.correlation_id == 3
    assert (decoded.error_code, decoded.session_id, decoded.responses) == (70, 0, [])
    (record,) = of(Record, other)
    assert (record.verdict, record.error_code) == ("DROPPED", 70)


def test_a_session_opened_on_another_connection_is_not_continued_here():
    """After a policy change revokes a topic, its connection is closed (fetch_session_denied);
    the client must not keep the old session's partitions by naming its id elsewhere."""
    first, second = layer(FETCH_T1), layer(FETCH_T1)
    first.client_data(_fetch_in_session(1, 11, 0, 0))
    first.upstream_data(_fetch_answer(11, 1, 77))
    assert of(ToUpstream, first.client_data(_fetch_in_session(2, 11, 77, 1)))
    out = second.client_data(_fetch_in_session(1, 11, 77, 2))
    assert not of(ToUpstream, out) and of(ToClient, out)


def test_a_failed_or_sessionless_fetch_opens_no_session():
    lay = layer(FETCH_T1)
    lay.client_data(_fetch_in_session(1, 11, 0, 0))
    lay.upstream_data(_fetch_answer(11, 1, 77, error_code=29))
    assert not of(ToUpstream, lay.client_data(_fetch_in_session(2, 11, 77, 1)))
    assert of(ToUpstream, lay.client_data(_fetch_in_session(3, 11, 0, -1)))  # no session: fine
    assert not lay.fetch_sessions.ids


def test_without_l7_rules_fetch_sessions_pass_untouched():
    lay = layer(None)
    incremental = _fetch_in_session(1, 11, 77, 5)
    assert _upstream_bytes(lay.client_data(incremental)) == incremental
