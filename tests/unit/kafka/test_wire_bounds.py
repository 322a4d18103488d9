"""Counts and lengths from the wire are bounded by the bytes that remain (issue 19).

A Produce v8 whose topic count is 13 million and whose topic name length is -6 made
`produce_topics` loop once per claimed topic without moving forward (the name length -6 and the
partition count's 4 bytes cancel out): 11 s of a gateway worker's CPU for 214 bytes. Each test
here fails on the code before the fix (it either takes seconds or accepts a length it must not).
"""

from __future__ import annotations

import base64
import functools
import struct
import time

import pytest

from parsers.kafka.apis import API_TABLE
from parsers.kafka.codec import DecodeError, compile_struct, read_tags
from parsers.kafka.fastpath import Incomplete, produce_response_error, produce_topics
from parsers.kafka.frames import FrameError, parse_request_header, response_header_size

# The issue's request. Its base64 text is one character short (285 data characters, which no
# byte string encodes to); its first 213 bytes decode unambiguously and already hold everything
# the parser reads, and the size prefix (210) asks for one more byte: the filler 0x55 of the run
# it ends (one more "V" in the last group). Produce v8, client id length -219, transactional id
# length -1023, 13,369,344 topics, then names of length 0 up to one of length -6 (0xfffa).
ISSUE_REQUEST = base64.b64decode(
    "AAAA0gAAAAgAAAAH/yX8AQAAAAAAAADMAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAD/"
    "+gAAAAAAVVVVVVVVAAAAAAAAABEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAP/6AAAA"
    "AABVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVVV"
    "VVVVVVVVVQ==",
    validate=True,
)
FAST = 0.05  # seconds: the issue's bound for refusing it


def _fastest(calls):
    """The last call's result (or exception) and the fastest call's time: a decoder that loops
    over a huge count is slow every time, while a pause of the host or the collector (seen in
    CI: 0.13 s) hits one call."""
    took = []
    for call in calls:
        start = time.perf_counter()
        try:
            result = call()
        except Exception as exc:  # noqa: BLE001 - the caller asserts the type
            result = exc
        took.append(time.perf_counter() - start)
    return result, min(took)


def _timed(fn, *args, **kw):
    """fn(*args, **kw) three times (_fastest)."""
    return _fastest([functools.partial(fn, *args, **kw)] * 3)


def _timed_layer(rules, raw: bytes):
    """As _timed for a Kafka layer, which keeps state: a new layer for each of the three calls."""
    from l7proxy.kafka.layer import KafkaLayer, KafkaSettings

    layers = [KafkaLayer(lambda: rules, KafkaSettings()) for _ in range(3)]
    out, took = _fastest([functools.partial(lay.client_data, raw) for lay in layers])
    return layers[-1], out, took


def test_issue_request_is_what_the_issue_describes():
    assert len(ISSUE_REQUEST) == 214
    assert struct.unpack_from(">i", ISSUE_REQUEST)[0] == 210
    assert struct.unpack_from(">hhih", ISSUE_REQUEST, 4) == (0, 8, 7, -219)
    assert struct.unpack_from(">hhii", ISSUE_REQUEST, 14) == (-1023, 0, 0, 13_369_344)
    assert ISSUE_REQUEST.index(b"\xff\xfa") < 80


def test_issue_request_is_refused_fast_by_produce_topics():
    # The header parser refuses its client id length now; the fast path must refuse the body on
    # its own too (it is called with the body offset the header gave before).
    for flexible, prefix in ((False, False), (False, True)):
        result, took = _timed(produce_topics, memoryview(ISSUE_REQUEST), 14, 8, flexible, prefix)
        assert isinstance(result, Incomplete if prefix else DecodeError), result
        assert took < FAST


def _produce_v8(count: int, name_len: int, txn_len: int = -1, pad: int = 200) -> bytes:
    body = struct.pack(">hhih", 0, 8, 7, -1) + struct.pack(">hhii", txn_len, 1, 1000, count)
    body += struct.pack(">hi", name_len, 0) * 4 + bytes(pad)
    return struct.pack(">i", len(body)) + body


def test_header_refuses_negative_client_id_but_not_null():
    with pytest.raises(FrameError):
        parse_request_header(ISSUE_REQUEST, API_TABLE[0].flexible_min, 4)
    assert parse_request_header(_produce_v8(1, 2), None, 4).client_id is None


@pytest.mark.parametrize("name_len", [-6, -2, -1])
def test_huge_topic_count_with_a_non_advancing_name_is_refused_fast(name_len):
    raw = _produce_v8(13_369_344, name_len)
    header = parse_request_header(raw, API_TABLE[0].flexible_min, 4)
    result, took = _timed(produce_topics, memoryview(raw), header.body_offset, 8, False)
    assert isinstance(result, DecodeError) and took < FAST


def test_topic_count_must_fit_the_bytes_that_remain():
    raw = _produce_v8(4, 0, pad=0)  # exactly four empty names with no partitions: 24 bytes
    assert produce_topics(memoryview(raw), 14, 8, False)[1] == [""]  # each topic once
    raw = _produce_v8(5, 0, pad=0)
    with pytest.raises(DecodeError, match="cannot fit"):
        produce_topics(memoryview(raw), 14, 8, False)
    # A prefix told the frame's length checks its count against the frame, not the prefix.
    with pytest.raises(Incomplete):
        produce_topics(memoryview(raw), 14, 8, False, prefix=True, frame_end=len(raw))


def test_negative_lengths_other_than_null_are_protocol_errors():
    raw = _produce_v8(1, 2, txn_len=-2)
    with pytest.raises(DecodeError, match="transactional id"):
        produce_topics(memoryview(raw), 14, 8, False)
    # Records length -2 (null is -1).
    body = struct.pack(">hhih", 0, 8, 7, -1) + struct.pack(">hhii", -1, 1, 1000, 1)
    body += struct.pack(">h", 1) + b"t" + struct.pack(">iii", 1, 0, -2)
    with pytest.raises(DecodeError, match="records length"):
        produce_topics(memoryview(struct.pack(">i", len(body)) + body), 14, 8, False)
    body = body[:-4] + struct.pack(">i", -1)
    assert produce_topics(memoryview(struct.pack(">i", len(body)) + body), 14, 8, False)[1] == ["t"]


def test_flexible_produce_null_topic_name_and_huge_counts():
    # v9: compact lengths. A compact topic name of 0 is null, which a topic name cannot be.
    head = struct.pack(">hhih", 0, 9, 7, -1) + b"\x00" + b"\x00" + struct.pack(">hi", 1, 1000)
    for topics in (b"\x02\x00", b"\xff\xff\xff\xff\x0f\x00", b"\xff\xff\xff\xff\x0f\x01"):
        raw = struct.pack(">i", len(head) + len(topics) + 64) + head + topics + bytes(64)
        result, took = _timed(produce_topics, memoryview(raw), 15, 9, True)
        assert isinstance(result, DecodeError) and took < FAST


def test_produce_response_counts_are_bounded():
    for version, flexible in ((8, False), (9, True)):
        if flexible:
            bodies = [b"\xff\xff\xff\xff\x0f" + bytes(40)]
        else:
            bodies = [struct.pack(">i", 10**8) + bytes(40), struct.pack(">i", -2) + bytes(40)]
            bodies.append(struct.pack(">ih", 1, -7) + bytes(40))  # topic name length -7
        for body in bodies:
            result, took = _timed(produce_response_error, body, 0, version, flexible)
            assert isinstance(result, DecodeError) and took < FAST, (version, body[:8])


@pytest.mark.parametrize("key", sorted(API_TABLE))
def test_codec_refuses_counts_that_cannot_fit(key):
    """Every request and response at its newest version: a huge first array count, a -2 count
    and a -2 string length are DecodeErrors, quickly, not loops."""
    spec = API_TABLE[key]
    version = spec.versions[1]
    for fields in (spec.request_fields, spec.response_fields):
        codec = spec.request_codec(version) if fields is spec.request_fields else None
        codec = codec or spec.response_codec(version)
        for first in _first_length_fields(fields, version):
            for bad in _bad_lengths(first, spec.flexible(version)):
                data = memoryview(bad + bytes(64))
                result, took = _timed(codec.decode, data, 0)
                assert isinstance(result, DecodeError), (key, first, bad, result)
                assert took < FAST


def _first_length_fields(fields, version):
    """The kind of the first field if it is a length-prefixed one (else nothing to try)."""
    for name, kind, versions, _nullable, _tag, tagged, _d, _c in fields:
        if not versions[0] <= version <= versions[1]:
            continue
        if tagged is not None and tagged[0] <= version <= tagged[1]:
            continue
        if kind.startswith("[]") or kind in ("string", "bytes"):
            return [(name, kind)]
        return []
    return []


def _bad_lengths(field, flexible):
    _name, kind = field
    if flexible:
        return [b"\xff\xff\xff\xff\x0f"]  # 2^32 - 2 elements or bytes
    if kind.startswith("[]"):
        return [struct.pack(">i", 10**9), struct.pack(">i", -2)]
    if kind == "string":
        return [struct.pack(">h", -2), struct.pack(">h", 32000)]
    return [struct.pack(">i", -2), struct.pack(">i", 10**9)]


def test_codec_array_bound_uses_the_element_size():
    # Metadata v1 request: topics [] of {name: string}: each element needs 2 bytes at least.
    codec = API_TABLE[3].request_codec(1)
    ok = struct.pack(">i", 3) + struct.pack(">h", 0) * 3
    assert codec.decode(memoryview(ok), 0)[0]["topics"] == [{"name": ""}] * 3
    with pytest.raises(DecodeError, match="cannot fit"):
        codec.decode(memoryview(struct.pack(">i", 4) + struct.pack(">h", 0) * 3), 0)
    assert codec.min_size == 4
    assert compile_struct(API_TABLE[0].request_fields, 9, True).min_size == 1 + 2 + 4 + 1 + 1


def test_tagged_field_counts_are_bounded():
    with pytest.raises(DecodeError):
        read_tags(memoryview(b"\xff\xff\xff\xff\x0f" + bytes(8)), 0)
    with pytest.raises(FrameError):
        response_header_size(3, True, b"\x00" * 4 + b"\xff\xff\xff\x7f" + bytes(8), 4)
    assert read_tags(memoryview(b"\x01\x05\x01x"), 0) == ([(5, b"x")], 4)


def test_issue_request_closes_the_layer_connection_fast():
    from l7proxy.kafka.layer import Close
    from policies.l7 import KafkaRuleSet
    from policies.model import KafkaRule

    rules = KafkaRuleSet([KafkaRule(api_keys=(0,), topic="t1")])
    for raw in (ISSUE_REQUEST, _produce_v8(13_369_344, -6)):
        lay, out, took = _timed_layer(rules, raw)
        assert lay.closed and [type(c) for c in out if isinstance(c, Close)] == [Close]
        assert took < FAST


# Red-team finding after issue 19: every count fits its bytes, but each decoded element costs
# ~2 us and ~250 bytes as a dict, then a policy check and a flow record per Metadata topic. A
# 2 MB Metadata v9 of one million empty topic names (2 bytes each) cost a real gateway
# (`--workers 1`) 27 s of CPU and 1.8 GiB; its other clients timed out meanwhile. A request may
# now hold at most KafkaSettings.max_request_elements array elements in all (100,000 by
# default), checked as each array's count is read, before any of it is decoded.
def _metadata_v9(count: int) -> bytes:
    from parsers.kafka.codec import write_uvarint

    body = bytearray(struct.pack(">hhih", 3, 9, 1, -1) + b"\x00")
    write_uvarint(body, count + 1)
    body += b"\x01\x00" * count + b"\x00\x00\x00\x00"
    return struct.pack(">i", len(body)) + bytes(body)


def test_a_request_of_a_million_tiny_elements_is_refused_fast():
    from l7proxy.kafka.layer import Close
    from policies.l7 import KafkaRuleSet
    from policies.model import KafkaRule

    rules = KafkaRuleSet([KafkaRule(api_keys=(0, 3), topic="t1")])
    lay, out, took = _timed_layer(rules, _metadata_v9(1_000_000))
    assert lay.closed and [type(c) for c in out if isinstance(c, Close)] == [Close]
    assert took < FAST


def test_the_element_budget_counts_nested_arrays_and_allows_what_fits():
    from parsers.kafka.codec import compile_struct, decode_bounded

    any_version = (0, 0x7FFF)
    parts = ("parts", "[]int32", any_version, None, None, None, None, ())
    fields = (("topics", "[]", any_version, None, None, None, None, (parts,)),)
    nested = compile_struct(fields, 0, False)
    # 3 topics of 2 partitions each: 3 + 6 = 9 elements.
    raw = struct.pack(">i", 3) + struct.pack(">iii", 2, 7, 8) * 3
    assert decode_bounded(nested, memoryview(raw), 0, 9)[0]["topics"][2] == {"parts": [7, 8]}
    with pytest.raises(DecodeError, match="more than 8 array elements"):
        decode_bounded(nested, memoryview(raw), 0, 8)

    spec = API_TABLE[3]
    raw = _metadata_v9(1000)
    header = parse_request_header(raw, spec.flexible_min, 4)
    codec = spec.request_codec(9)
    value, _ = decode_bounded(codec, memoryview(raw), header.body_offset, 1000)
    assert len(value["topics"]) == 1000
    with pytest.raises(DecodeError, match="more than 999 array elements"):
        decode_bounded(codec, memoryview(raw), header.body_offset, 999)
    # Without a bound (responses, tests), the plain decoder is unchanged.
    assert len(codec.decode(memoryview(raw), header.body_offset)[0]["topics"]) == 1000
