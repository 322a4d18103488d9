"""The schema codec against kafka-python's encoder, framing limits and request headers."""

from __future__ import annotations

import struct

import pytest

from parsers.kafka.apis import API_TABLE, topics_of
from parsers.kafka.codec import DecodeError
from parsers.kafka.fastpath import produce_response_error, produce_topics
from parsers.kafka.frames import FrameDecoder, FrameError, frame, parse_request_header
from parsers.kafka.responses import error_codes
from tests.unit.kafka.gen_schemas import render
from tests.unit.kafka.samples import TOPIC_ID, kafka_python_classes, sample

REQUESTS, RESPONSES = kafka_python_classes()


def test_generated_schemas_are_up_to_date():
    from pathlib import Path

    import parsers.kafka.schemas as schemas

    assert Path(schemas.__file__).read_text() == render()


def _versions():
    for key, spec in sorted(API_TABLE.items()):
        if key in REQUESTS:
            for version in range(spec.versions[0], spec.versions[1] + 1):
                yield pytest.param(key, version, id=f"{spec.name}-v{version}")


@pytest.mark.parametrize(("key", "version"), list(_versions()))
def test_request_roundtrip_matches_kafka_python(key, version):
    """Our encoding of a sample request is what kafka-python encodes for the same values, and
    decoding it gives the values back."""
    spec = API_TABLE[key]
    codec = spec.request_codec(version)
    value = sample(spec.request_fields, version)
    ours = bytearray()
    codec.encode(ours, value)
    message = REQUESTS[key].decode(bytes(ours), version=version)
    message.with_header(correlation_id=0)
    theirs = message.encode(version=version)
    assert bytes(ours) == theirs
    back, pos = codec.decode(memoryview(bytes(ours)), 0)
    assert pos == len(ours)
    again = bytearray()
    codec.encode(again, back)
    assert again == ours


@pytest.mark.parametrize("version", range(0, API_TABLE[0].versions[1] + 1))
def test_produce_fast_path_agrees_with_the_codec(version):
    spec = API_TABLE[0]
    value = sample(spec.request_fields, version)
    value["topic_data"] = [
        {"name": f"t{i}", "topic_id": bytes([i + 1]) * 16,
         "partition_data": [{"index": p, "records": b"r" * (10 * p)} for p in range(3)]}
        for i in range(3)
    ]  # fmt: skip
    out = bytearray(b"HEAD")
    spec.request_codec(version).encode(out, value)
    acks, names, ids = produce_topics(memoryview(bytes(out)), 4, version, spec.flexible(version))
    refs = topics_of(0, version, spec.request_codec(version).decode(memoryview(bytes(out)), 4)[0])
    assert acks == value["acks"]
    assert (tuple(names), tuple(ids)) == (refs.names, refs.ids)
    assert len(names) + len(ids) == 3
    with pytest.raises(DecodeError):
        produce_topics(memoryview(bytes(out[:-7])), 4, version, spec.flexible(version))


@pytest.mark.parametrize("version", range(0, API_TABLE[0].versions[1] + 1))
def test_produce_response_fast_path_agrees_with_the_codec(version):
    spec = API_TABLE[0]
    codec = spec.response_codec(version)
    flexible = spec.flexible(version)
    for codes in ((0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 6, 0), (0, 0, 0, 10, 0, 6), (29, 0, 0, 0, 0, 0)):
        value = sample(spec.response_fields, version)
        partition = value["responses"][0]["partition_responses"][0]
        value["responses"] = [
            {**value["responses"][0], "name": f"t{t}", "topic_id": bytes([t + 1]) * 16,
             "partition_responses": [{**partition, "index": p, "error_code": codes[3 * t + p],
                                      "record_errors": [{"batch_index": p,
                                                         "batch_index_error_message": "m" * p}],
                                      "error_message": None if p else "bad"}
                                     for p in range(3)]}
            for t in range(2)
        ]  # fmt: skip
        body = bytearray()
        codec.encode(body, value)
        found = error_codes(codec.decode(memoryview(bytes(body)), 0)[0])
        assert produce_response_error(bytes(body), 0, version, flexible) == (found or [0])[0]
        assert produce_response_error(bytes(body), 0, version, flexible) == next(
            (c for c in codes if c), 0
        )
    with pytest.raises(DecodeError):
        produce_response_error(bytes(body[:9]), 0, version, flexible)


def test_truncated_body_is_a_decode_error():
    codec = API_TABLE[0].request_codec(9)
    out = bytearray()
    codec.encode(out, sample(API_TABLE[0].request_fields, 9))
    for cut in (1, 5, len(out) // 2, len(out) - 1):
        with pytest.raises(DecodeError):
            codec.decode(memoryview(bytes(out[:cut])), 0)


def test_array_count_larger_than_frame_is_rejected_without_allocating():
    codec = API_TABLE[0].request_codec(3)
    body = struct.pack(">hhii", -1, 1, 1000, 0x7FFFFFFF)
    with pytest.raises(DecodeError):
        codec.decode(memoryview(body), 0)


def test_frames_split_across_reads():
    dec = FrameDecoder(1024)
    data = frame(b"a" * 10) + frame(b"b" * 3)
    got = []
    for i in range(len(data)):
        got += dec.receive_data(data[i : i + 1])
    assert got == [frame(b"a" * 10), frame(b"b" * 3)]
    assert dec.buffered == 0
    # Frames inside one read come out of it; a read that is exactly one frame is not copied.
    assert FrameDecoder(1024).receive_data(data) == [frame(b"a" * 10), frame(b"b" * 3)]
    one = frame(b"c" * 100)
    assert FrameDecoder(1024).receive_data(one)[0] is one
    # A frame over three reads, the size prefix itself split.
    dec = FrameDecoder(1024)
    assert dec.receive_data(one[:2]) == [] and dec.receive_data(one[2:50]) == []
    assert dec.receive_data(one[50:] + frame(b"d")[:3]) == [one]
    assert dec.receive_data(frame(b"d")[3:]) == [frame(b"d")]


def test_oversized_frame_closes():
    dec = FrameDecoder(100)
    with pytest.raises(FrameError) as err:
        dec.receive_data(struct.pack(">i", 101))
    assert err.value.reason == "frame_too_large" and err.value.hint == "close"


def test_negative_frame_closes():
    with pytest.raises(FrameError) as err:
        FrameDecoder().receive_data(struct.pack(">i", -5) + b"xxxx")
    assert err.value.reason == "negative_frame_size"


def _header(key, version, cid, client_id, flexible):
    cid_bytes = client_id.encode()
    h = struct.pack(">hhih", key, version, cid, len(cid_bytes)) + cid_bytes
    return h + (b"\x00" if flexible else b"")


def test_request_header_v1_and_v2():
    h1 = parse_request_header(_header(0, 8, 7, "app", False) + b"BODY", 9)
    assert (h1.api_key, h1.api_version, h1.correlation_id, h1.client_id) == (0, 8, 7, "app")
    assert not h1.flexible and h1.body_offset == 13
    # v2: client id stays an int16 string, then tagged fields (here one tag of 2 bytes).
    raw = struct.pack(">hhih", 0, 9, 8, 3) + b"app" + b"\x01\x05\x02zz" + b"BODY"
    h2 = parse_request_header(raw, 9)
    assert h2.flexible and h2.client_id == "app" and raw[h2.body_offset :] == b"BODY"


def test_request_header_null_client_id_and_v0():
    raw = struct.pack(">hhih", 3, 1, 9, -1)
    assert parse_request_header(raw, 9).client_id is None
    h0 = parse_request_header(struct.pack(">hhi", 7, 0, 5), None)
    assert h0.body_offset == 8 and h0.client_id is None


def test_topics_of_every_topic_bearing_api():
    expect_names = {
        0: {"topic_data.name"}, 1: {"topics.topic"}, 2: {"topics.name"}, 3: {"topics.name"},
        8: {"topics.name"}, 19: {"topics.name"}, 20: {"topic_names-0"}, 21: {"topics.name"},
        23: {"topics.topic"}, 24: {"v3_and_below_topics.name"}, 28: {"topics.name"},
        32: {"resources.resource_name"}, 33: {"resources.resource_name"}, 37: {"topics.name"},
        44: {"resources.resource_name"}, 61: {"topics.name"}, 75: {"topics.name"},
    }  # fmt: skip
    for key, names in expect_names.items():
        spec = API_TABLE[key]
        version = 3 if key == 24 else (5 if key == 20 else min(spec.versions[1], 4))
        refs = topics_of(key, version, sample(spec.request_fields, version))
        assert set(refs.names) == names, spec.name
    # Topic ids: Fetch v13+, OffsetCommit v10, ConsumerGroupHeartbeat, DeleteTopics v6.
    for key, version in ((1, 13), (8, 10), (68, 0), (20, 6), (0, 13), (9, 10)):
        refs = topics_of(key, version, sample(API_TABLE[key].request_fields, version))
        assert TOPIC_ID in refs.ids, API_TABLE[key].name
    # OffsetFetch multi-group form (v8+), AddPartitionsToTxn batched form (v4+).
    assert topics_of(9, 8, sample(API_TABLE[9].request_fields, 8)).names == ("topics.name",)
    assert topics_of(24, 4, sample(API_TABLE[24].request_fields, 4)).names == ("topics.name",)
    assert topics_of(68, 0, sample(API_TABLE[68].request_fields, 0)).names == (
        "subscribed_topic_names-0",
    )


def test_metadata_all_topics_forms():
    assert topics_of(3, 1, {"topics": None}).all_topics
    assert topics_of(3, 0, {"topics": []}).all_topics
    assert not topics_of(3, 1, {"topics": []}).all_topics
