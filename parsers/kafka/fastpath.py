"""Produce without the generic codec: the hot request only needs acks and its topic names/ids,
and its response only its first non-zero error code (for flows and metrics).

Record batches are skipped by their length, never read. The generic decoder still runs when a
Produce is denied (the error response mirrors every partition), which is the cold path.

Every count and length read here is checked before it is looped over or sliced: a count of N
elements needs at least N times the smallest element's size in the bytes that remain, and a
negative length other than null (-1) is a protocol error. Each loop step therefore moves
forward, and the work is bounded by the frame's size whatever the counts claim.
"""

from __future__ import annotations

import struct

from parsers.kafka.codec import DecodeError, read_uvarint

_I16 = struct.Struct(">h").unpack_from
_I32 = struct.Struct(">i").unpack_from


class Incomplete(Exception):
    """The bytes so far end before the last topic name (prefix mode only)."""


def _request_sizes(version: int, flexible: bool) -> tuple[int, int]:
    """Smallest encoded (topic, partition) of a Produce request: a topic is its name or id,
    its partition count and (flexible) its tag count; a partition is its index, its records
    length and (flexible) its tag count."""
    if flexible:
        return (18 if version >= 13 else 3), 6
    return 6, 8


def produce_topics(
    buf, pos: int, version: int, flexible: bool, prefix: bool = False, frame_end: int = -1
) -> tuple[int, list, list]:
    """(acks, topic names, topic ids) of a Produce request body starting at `pos`, each topic
    once.

    With `prefix=True`, `buf` may be the start of the frame only: the answer comes as soon as the
    last topic name is read (the records after it are not needed), and `Incomplete` is raised when
    the bytes stop before that. `frame_end` (the whole frame's length, if known) lets a prefix
    check its topic count against the frame; without it each topic still has to fit in `buf`.
    """
    end = len(buf)
    try:
        if version >= 3:
            if flexible:
                n, pos = read_uvarint(buf, pos)
                pos += max(n - 1, 0)
            else:
                n = _I16(buf, pos)[0]
                if n < -1:
                    raise DecodeError(f"negative transactional id length {n}")
                pos += 2 + max(n, 0)
        acks = _I16(buf, pos)[0]
        pos += 6  # acks, timeout_ms
        if flexible:
            count, pos = read_uvarint(buf, pos)
            count -= 1
        else:
            count = _I32(buf, pos)[0]
            pos += 4
        topic_size, partition_size = _request_sizes(version, flexible)
        limit = frame_end if prefix and frame_end >= 0 else end
        if count < -1:
            raise DecodeError(f"negative topic count {count}")
        if count * topic_size > limit - pos:
            raise DecodeError(f"{count} topics cannot fit in {limit - pos} bytes")
        names, ids = [], []
        last = count - 1
        for i in range(max(count, 0)):
            if version >= 13:
                if pos + 16 > end:
                    raise DecodeError("truncated topic id")
                ids.append(bytes(buf[pos : pos + 16]))
                pos += 16
            else:
                if flexible:
                    n = buf[pos]
                    if n < 0x80:
                        pos += 1
                    else:
                        n, pos = read_uvarint(buf, pos)
                    n -= 1
                else:
                    n = _I16(buf, pos)[0]
                    pos += 2
                if n < 0:
                    raise DecodeError(f"topic name length {n}")
                if pos + n > end:
                    raise DecodeError("topic name runs past the bytes")
                names.append(str(buf[pos : pos + n], "utf-8"))
                pos += n
            if prefix and i == last:
                return acks, _distinct(names), _distinct(ids)
            if flexible:
                parts = buf[pos]
                if parts < 0x80:
                    pos += 1
                else:
                    parts, pos = read_uvarint(buf, pos)
                parts -= 1
            else:
                parts = _I32(buf, pos)[0]
                pos += 4
            if parts < -1:
                raise DecodeError(f"negative partition count {parts}")
            if parts * partition_size > end - pos:
                raise DecodeError(f"{parts} partitions cannot fit in {end - pos} bytes")
            for _ in range(max(parts, 0)):
                pos += 4  # partition index
                if flexible:
                    n, pos = read_uvarint(buf, pos)
                    pos += max(n - 1, 0)
                    pos = _skip_tags(buf, pos)
                else:
                    n = _I32(buf, pos)[0]
                    if n < -1:
                        raise DecodeError(f"negative records length {n}")
                    pos += 4 + max(n, 0)
            if flexible:
                pos = pos + 1 if buf[pos] == 0 else _skip_tags(buf, pos)
            if pos > end:
                raise DecodeError("produce request runs past its frame")
    except (struct.error, IndexError, DecodeError, UnicodeDecodeError) as exc:
        if prefix:
            raise Incomplete() from None
        raise DecodeError(f"truncated produce request: {exc}") from None
    return acks, _distinct(names), _distinct(ids)


def _distinct(items: list) -> list:
    """Each topic once, in order (a request may name one many times: one flow, one check)."""
    return list(dict.fromkeys(items)) if len(items) > 1 else items


def _response_sizes(version: int, flexible: bool) -> tuple[int, int, int]:
    """Smallest encoded (topic, partition, record error) of a Produce response."""
    string = 1 if flexible else 2
    count = 1 if flexible else 4
    tags = 1 if flexible else 0
    topic = (16 if version >= 13 else string) + count + tags
    partition = 14 + (8 if version >= 2 else 0) + (8 if version >= 5 else 0) + tags
    if version >= 8:
        partition += count + string
    return topic, partition, 4 + string + tags


def produce_response_error(buf, pos: int, version: int, flexible: bool) -> int:
    """The first non-zero partition error code of a Produce response body at `pos` (0: none),
    what `responses.error_codes` finds first in the decoded message. Raises DecodeError when the
    body ends early or a count or length cannot be right."""
    topic_size, partition_size, record_error_size = _response_sizes(version, flexible)
    try:
        topics, pos = _count(buf, pos, flexible, topic_size)
        for _ in range(topics):
            pos = pos + 16 if version >= 13 else _skip_string(buf, pos, flexible)
            partitions, pos = _count(buf, pos, flexible, partition_size)
            for _ in range(partitions):
                code = _I16(buf, pos + 4)[0]
                if code:
                    return code
                # index, error_code, base_offset, log_append_time_ms (v2+), log_start_offset (v5+)
                pos += 14 + (8 if version >= 2 else 0) + (8 if version >= 5 else 0)
                if version >= 8:
                    record_errors, pos = _count(buf, pos, flexible, record_error_size)
                    for _ in range(record_errors):
                        pos = _skip_string(buf, pos + 4, flexible)  # batch_index, its message
                        if flexible:
                            pos = _skip_tags(buf, pos)
                    pos = _skip_string(buf, pos, flexible)  # error_message
                if flexible:
                    pos = _skip_tags(buf, pos)
            if flexible:
                pos = _skip_tags(buf, pos)
    except (struct.error, IndexError) as exc:
        raise DecodeError(f"truncated produce response: {exc}") from None
    if pos > len(buf):
        raise DecodeError("produce response runs past its frame")
    return 0


def _count(buf, pos: int, flexible: bool, item_size: int) -> tuple[int, int]:
    """An array length (null counts as empty), checked against the bytes left."""
    if flexible:
        n, pos = read_uvarint(buf, pos)
        n -= 1
    else:
        n = _I32(buf, pos)[0]
        pos += 4
    if n < -1:
        raise DecodeError(f"negative array length {n}")
    if n * item_size > len(buf) - pos:
        raise DecodeError(f"{n} elements cannot fit in {len(buf) - pos} bytes")
    return max(n, 0), pos


def _skip_string(buf, pos: int, flexible: bool) -> int:
    """Past a (nullable) string."""
    if flexible:
        n, pos = read_uvarint(buf, pos)
        return pos + max(n - 1, 0)
    n = _I16(buf, pos)[0]
    if n < -1:
        raise DecodeError(f"negative string length {n}")
    return pos + 2 + max(n, 0)


def _skip_tags(buf, pos: int) -> int:
    """Past a tagged-field section; each field takes at least two bytes (tag, size)."""
    if pos < len(buf) and buf[pos] == 0:
        return pos + 1
    count, pos = read_uvarint(buf, pos)
    if count * 2 > len(buf) - pos:
        raise DecodeError(f"{count} tagged fields cannot fit in {len(buf) - pos} bytes")
    for _ in range(count):
        _tag, pos = read_uvarint(buf, pos)
        size, pos = read_uvarint(buf, pos)
        pos += size
    return pos
