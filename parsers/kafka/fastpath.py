"""Produce without the generic codec: the hot request only needs acks and its topic names/ids,
and its response only its first non-zero error code (for flows and metrics).

Record batches are skipped by their length, never read. The generic decoder still runs when a
Produce is denied (the error response mirrors every partition), which is the cold path.
"""

from __future__ import annotations

import struct

from parsers.kafka.codec import DecodeError, read_uvarint

_I16 = struct.Struct(">h").unpack_from
_I32 = struct.Struct(">i").unpack_from


class Incomplete(Exception):
    """The bytes so far end before the last topic name (prefix mode only)."""


def produce_topics(
    buf, pos: int, version: int, flexible: bool, prefix: bool = False
) -> tuple[int, list, list]:
    """(acks, topic names, topic ids) of a Produce request body starting at `pos`.

    With `prefix=True`, `buf` may be the start of the frame only: the answer comes as soon as the
    last topic name is read (the records after it are not needed), and `Incomplete` is raised when
    the bytes stop before that.
    """
    end = len(buf)
    try:
        if version >= 3:
            if flexible:
                n, pos = read_uvarint(buf, pos)
                pos += max(n - 1, 0)
            else:
                pos += 2 + max(_I16(buf, pos)[0], 0)
        acks = _I16(buf, pos)[0]
        pos += 6  # acks, timeout_ms
        if flexible:
            count, pos = read_uvarint(buf, pos)
            count -= 1
        else:
            count = _I32(buf, pos)[0]
            pos += 4
        names, ids = [], []
        for _ in range(max(count, 0)):
            if version >= 13:
                ids.append(bytes(buf[pos : pos + 16]))
                pos += 16
            elif flexible:
                n, pos = read_uvarint(buf, pos)
                names.append(str(buf[pos : pos + n - 1], "utf-8"))
                pos += n - 1
            else:
                n = _I16(buf, pos)[0]
                names.append(str(buf[pos + 2 : pos + 2 + n], "utf-8"))
                pos += 2 + n
            if prefix and len(names) + len(ids) == count:
                if pos > end:
                    raise Incomplete()
                return acks, names, ids
            if flexible:
                parts, pos = read_uvarint(buf, pos)
                parts -= 1
            else:
                parts = _I32(buf, pos)[0]
                pos += 4
            for _ in range(max(parts, 0)):
                pos += 4  # partition index
                if flexible:
                    n, pos = read_uvarint(buf, pos)
                    pos += max(n - 1, 0)
                    pos = _skip_tags(buf, pos)
                else:
                    pos += 4 + max(_I32(buf, pos)[0], 0)
            if flexible:
                pos = _skip_tags(buf, pos)
            if pos > end:
                raise DecodeError("produce request runs past its frame")
    except (struct.error, IndexError, DecodeError, UnicodeDecodeError) as exc:
        if prefix:
            raise Incomplete() from None
        raise DecodeError(f"truncated produce request: {exc}") from None
    return acks, names, ids


def produce_response_error(buf, pos: int, version: int, flexible: bool) -> int:
    """The first non-zero partition error code of a Produce response body at `pos` (0: none),
    what `responses.error_codes` finds first in the decoded message. Raises DecodeError when the
    body ends early."""
    try:
        topics, pos = _count(buf, pos, flexible)
        for _ in range(topics):
            pos = pos + 16 if version >= 13 else _skip_string(buf, pos, flexible)
            partitions, pos = _count(buf, pos, flexible)
            for _ in range(partitions):
                code = _I16(buf, pos + 4)[0]
                if code:
                    return code
                # index, error_code, base_offset, log_append_time_ms (v2+), log_start_offset (v5+)
                pos += 14 + (8 if version >= 2 else 0) + (8 if version >= 5 else 0)
                if version >= 8:
                    record_errors, pos = _count(buf, pos, flexible)
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


def _count(buf, pos: int, flexible: bool) -> tuple[int, int]:
    """An array length (null counts as empty)."""
    if flexible:
        n, pos = read_uvarint(buf, pos)
        return max(n - 1, 0), pos
    return max(_I32(buf, pos)[0], 0), pos + 4


def _skip_string(buf, pos: int, flexible: bool) -> int:
    """Past a (nullable) string."""
    if flexible:
        n, pos = read_uvarint(buf, pos)
        return pos + max(n - 1, 0)
    return pos + 2 + max(_I16(buf, pos)[0], 0)


def _skip_tags(buf, pos: int) -> int:
    count, pos = read_uvarint(buf, pos)
    for _ in range(count):
        _tag, pos = read_uvarint(buf, pos)
        size, pos = read_uvarint(buf, pos)
        pos += size
    return pos
