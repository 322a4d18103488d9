"""Kafka framing (int32 size prefix) and the request/response headers.

`FrameDecoder.receive_data(bytes)` returns the complete frames (without the size prefix) that the
bytes finished; a frame larger than `max_frame_size` or a negative size raises `FrameError`, whose
`hint` says what the proxy should do (always "close": Kafka has no way to answer a bad frame).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from parsers.kafka.keys import API_VERSIONS, CONTROLLED_SHUTDOWN

DEFAULT_MAX_FRAME_SIZE = 8 * 1024 * 1024
_SIZE = struct.Struct(">i")
_HEADER = struct.Struct(">hhi")  # api_key, api_version, correlation_id
_I16 = struct.Struct(">h")
_I32 = struct.Struct(">i")


class FrameError(ValueError):
    """A frame that must close the connection. `reason` is a short machine-friendly word."""

    hint = "close"

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


class FrameDecoder:
    """Splits a byte stream into frames, each returned *with* its 4-byte size prefix so that a
    forwarded frame is the same bytes object that came in.

    Copies are kept to at most one per byte: frames wholly inside one read are sliced out of it
    (no copy at all when the read is exactly one frame); a frame spread over reads is joined once
    when its last byte arrives.
    """

    __slots__ = ("max_frame_size", "_chunks", "_have", "_need")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE):
        self.max_frame_size = max_frame_size
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = -1  # bytes of the partial frame incl. prefix; -1 = size not known yet

    @property
    def buffered(self) -> int:
        return self._have

    def receive_data(self, data: bytes) -> list[bytes]:
        if self._chunks:
            self._chunks.append(data)
            self._have += len(data)
            if self._need < 0:
                if self._have < 4:
                    return []
                head = b"".join(self._chunks)
                self._chunks = [head]
                self._need = 4 + self._size_at(head, 0)
            if self._have < self._need:
                return []
            # Join exactly the frame (one copy); the bytes after it start the next round.
            excess = self._have - self._need
            rest = b""
            if excess:
                last = self._chunks[-1]
                self._chunks[-1] = last[: len(last) - excess]
                rest = last[len(last) - excess :]
            first = b"".join(self._chunks)
            self._chunks, self._have, self._need = [], 0, -1
            return [first, *self._split(rest)] if rest else [first]
        return self._split(data)

    def partial(self) -> tuple[int, bytes] | None:
        """(size of the frame being received incl. prefix, its bytes so far), or None. Joins the
        buffered chunks into one (later reads append to it)."""
        if self._need < 0 or not self._chunks:
            return None
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._need, self._chunks[0]

    def detach(self) -> int:
        """Give up the frame being received (its head was passed on); returns how many of its
        bytes are still to come, which the caller passes on without framing them."""
        left = self._need - self._have
        self._chunks, self._have, self._need = [], 0, -1
        return left

    def _split(self, data: bytes) -> list[bytes]:
        frames = []
        pos, n = 0, len(data)
        while n - pos >= 4:
            end = pos + 4 + self._size_at(data, pos)
            if end > n:
                self._need = end - pos
                break
            frames.append(data if pos == 0 and end == n else data[pos:end])
            pos = end
        if pos < n:
            self._chunks = [data[pos:]]
            self._have = n - pos
        return frames

    def _size_at(self, data: bytes, pos: int) -> int:
        size = _SIZE.unpack_from(data, pos)[0]
        check_size(size, self.max_frame_size)
        return size


def check_size(size: int, max_frame_size: int) -> None:
    if size < 0:
        raise FrameError("negative_frame_size", f"negative frame size {size}")
    if size > max_frame_size:
        raise FrameError(
            "frame_too_large", f"frame of {size} bytes exceeds the limit of {max_frame_size}"
        )


def frame(payload: bytes | bytearray) -> bytes:
    return _SIZE.pack(len(payload)) + payload


@dataclass(frozen=True, slots=True)
class RequestHeader:
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None
    flexible: bool  # request header v2 (tagged fields) and a flexible body
    body_offset: int  # where the request body starts in the frame


def request_header_flexible(api_key: int, api_version: int, flexible_min: int | None) -> bool:
    return flexible_min is not None and api_version >= flexible_min


def parse_request_header(
    frame_bytes: bytes, flexible_min: int | None, start: int = 0
) -> RequestHeader:
    """Parse a request header at `start` (4 for a frame with its size prefix); `flexible_min` is
    the API's first flexible version (None: never). `body_offset` counts from the same origin.

    The client id stays a classic int16 string even in header v2; only v2 adds tagged fields.
    """
    if len(frame_bytes) < start + 8:
        raise FrameError("short_header", "request shorter than its header")
    api_key, api_version, correlation_id = _HEADER.unpack_from(frame_bytes, start)
    if api_key == CONTROLLED_SHUTDOWN and api_version == 0:
        return RequestHeader(api_key, api_version, correlation_id, None, False, start + 8)
    if len(frame_bytes) < start + 10:
        raise FrameError("short_header", "request header has no client id")
    n = _I16.unpack_from(frame_bytes, start + 8)[0]
    pos = start + 10
    client_id = None
    if n < -1:
        raise FrameError("short_header", f"negative client id length {n}")
    if n >= 0:
        if pos + n > len(frame_bytes):
            raise FrameError("short_header", "client id runs past the frame")
        client_id = str(frame_bytes[pos : pos + n], "utf-8", "replace")
        pos += n
    flexible = request_header_flexible(api_key, api_version, flexible_min)
    if flexible:
        pos = _skip_tags(frame_bytes, pos)
    return RequestHeader(api_key, api_version, correlation_id, client_id, flexible, pos)


def response_header_size(api_key: int, flexible: bool, payload: bytes, pos: int = 4) -> int:
    """Offset of the response body: correlation id, plus tagged fields in header v1.

    ApiVersions responses always use header v0 so that any client can read the version list.
    """
    if flexible and api_key != API_VERSIONS:
        return _skip_tags(payload, pos)
    return pos


def encode_response_header(correlation_id: int, api_key: int, flexible: bool) -> bytes:
    if flexible and api_key != API_VERSIONS:
        return _I32.pack(correlation_id) + b"\x00"
    return _I32.pack(correlation_id)


def _skip_tags(data: bytes, pos: int) -> int:
    count, pos = _uvarint(data, pos)
    if count * 2 > len(data) - pos:  # each field: at least a tag and a size byte
        raise FrameError("short_header", f"{count} tagged fields cannot fit in the header")
    for _ in range(count):
        _tag, pos = _uvarint(data, pos)
        size, pos = _uvarint(data, pos)
        pos += size
    if pos > len(data):
        raise FrameError("short_header", "tagged fields run past the frame")
    return pos


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 28:
            raise FrameError("short_header", "bad varint in header")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7


def correlation_id_of(response: bytes) -> int:
    return _I32.unpack_from(response, 0)[0]
