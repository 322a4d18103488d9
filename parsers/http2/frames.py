"""HTTP/2 frame layer (RFC 9113 section 4 and 6): constants and frame builders.

Only what a relay needs: the 9-byte frame header is parsed inline by the relay's hot loop, and the
frames the proxy itself originates (SETTINGS, PING ACK, RST_STREAM, GOAWAY, WINDOW_UPDATE, and a
locally answered HEADERS/DATA) are built here.
"""

from __future__ import annotations

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER_SIZE = 9

# Frame types.
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
FLAG_END_STREAM = 0x1
FLAG_ACK = 0x1
FLAG_END_HEADERS = 0x4
FLAG_PADDED = 0x8
FLAG_PRIORITY = 0x20

# Error codes (section 7).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
SETTINGS_TIMEOUT = 0x4
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
CONNECT_ERROR = 0xA
ENHANCE_YOUR_CALM = 0xB
INADEQUATE_SECURITY = 0xC
HTTP_1_1_REQUIRED = 0xD

ERROR_NAMES = {
    NO_ERROR: "NO_ERROR",
    PROTOCOL_ERROR: "PROTOCOL_ERROR",
    INTERNAL_ERROR: "INTERNAL_ERROR",
    FLOW_CONTROL_ERROR: "FLOW_CONTROL_ERROR",
    SETTINGS_TIMEOUT: "SETTINGS_TIMEOUT",
    STREAM_CLOSED: "STREAM_CLOSED",
    FRAME_SIZE_ERROR: "FRAME_SIZE_ERROR",
    REFUSED_STREAM: "REFUSED_STREAM",
    CANCEL: "CANCEL",
    COMPRESSION_ERROR: "COMPRESSION_ERROR",
    CONNECT_ERROR: "CONNECT_ERROR",
    ENHANCE_YOUR_CALM: "ENHANCE_YOUR_CALM",
    INADEQUATE_SECURITY: "INADEQUATE_SECURITY",
    HTTP_1_1_REQUIRED: "HTTP_1_1_REQUIRED",
}

# SETTINGS identifiers (section 6.5.2).
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME_SIZE = 16_384
MAX_FRAME_SIZE_LIMIT = (1 << 24) - 1
MAX_WINDOW = (1 << 31) - 1


def frame_header(length: int, ftype: int, flags: int, stream_id: int) -> bytes:
    return (
        length.to_bytes(3, "big")
        + bytes((ftype, flags))
        + (stream_id & MAX_WINDOW).to_bytes(4, "big")
    )


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return frame_header(len(payload), ftype, flags, stream_id) + payload


def settings_frame(settings: list[tuple[int, int]] | tuple = ()) -> bytes:
    payload = b"".join(k.to_bytes(2, "big") + v.to_bytes(4, "big") for k, v in settings)
    return frame(SETTINGS, 0, 0, payload)


SETTINGS_ACK = frame(SETTINGS, FLAG_ACK, 0)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    return [
        (int.from_bytes(payload[i : i + 2], "big"), int.from_bytes(payload[i + 2 : i + 6], "big"))
        for i in range(0, len(payload), 6)
    ]


def capped_max_frame_size(value: int, cap: int) -> int:
    """A peer's SETTINGS_MAX_FRAME_SIZE lowered to `cap`, or 0 when the value is outside what
    RFC 9113 6.5.2 allows (a connection PROTOCOL_ERROR)."""
    if not DEFAULT_MAX_FRAME_SIZE <= value <= MAX_FRAME_SIZE_LIMIT:
        return 0
    return min(value, cap)


def stream_dependency(field: bytes) -> int:
    """The stream a HEADERS or PRIORITY frame's 4-byte priority field depends on."""
    return int.from_bytes(field, "big") & MAX_WINDOW


def ping_ack(opaque: bytes) -> bytes:
    return frame(PING, FLAG_ACK, 0, opaque)


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, code.to_bytes(4, "big"))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, last_stream_id.to_bytes(4, "big") + code.to_bytes(4, "big") + debug)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, increment.to_bytes(4, "big"))


def headers_frames(
    stream_id: int, block: bytes, end_stream: bool, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE
) -> bytes:
    """One HEADERS frame, followed by CONTINUATION frames when the block exceeds the peer's
    SETTINGS_MAX_FRAME_SIZE (the frames of one block are always written back to back)."""
    first_flags = FLAG_END_STREAM if end_stream else 0
    if len(block) <= max_frame_size:
        return frame_header(len(block), HEADERS, first_flags | FLAG_END_HEADERS, stream_id) + block
    chunks = [block[i : i + max_frame_size] for i in range(0, len(block), max_frame_size)]
    out = [frame(HEADERS, first_flags, stream_id, chunks[0])]
    for i, chunk in enumerate(chunks[1:], start=2):
        flags = FLAG_END_HEADERS if i == len(chunks) else 0
        out.append(frame(CONTINUATION, flags, stream_id, chunk))
    return b"".join(out)


def data_frame(stream_id: int, payload: bytes, end_stream: bool) -> bytes:
    return frame(DATA, FLAG_END_STREAM if end_stream else 0, stream_id, payload)


def strip_headers_payload(flags: int, payload: bytes) -> bytes | None:
    """The header block fragment of a HEADERS frame without padding and priority fields;
    None when the padding is longer than the payload (a PROTOCOL_ERROR)."""
    start = 0
    end = len(payload)
    if flags & FLAG_PADDED:
        if end < 1:
            return None
        end -= payload[0]
        start = 1
    if flags & FLAG_PRIORITY:
        start += 5
    if end < start:
        return None
    return payload[start:end] if start or end != len(payload) else payload
