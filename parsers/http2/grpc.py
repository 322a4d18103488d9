"""gRPC over HTTP/2: length-prefixed messages, status trailers, and the denied-call answer.

Wire format (gRPC PROTOCOL-HTTP2.md): each message is a 1-byte compressed flag, a 4-byte big-endian
length and the payload; a call ends with trailers carrying `grpc-status` and an optional
percent-encoded `grpc-message`.
"""

from __future__ import annotations

from dataclasses import dataclass

PERMISSION_DENIED = 7
UNIMPLEMENTED = 12
STATUS_NAMES = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}
MESSAGE_PREFIX = 5
DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024 + MESSAGE_PREFIX


class GrpcFramingError(Exception):
    """A message prefix announcing more than the reader's limit."""


@dataclass(frozen=True, slots=True)
class Message:
    compressed: bool
    payload: bytes


def encode_message(payload: bytes, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + len(payload).to_bytes(4, "big") + payload


class MessageReader:
    """Incremental length-prefixed message decoder with a size limit (sans-IO)."""

    __slots__ = ("_buffer", "max_message")

    def __init__(self, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buffer = bytearray()
        self.max_message = max_message

    def receive_data(self, data: bytes) -> list[Message]:
        self._buffer += data
        out = []
        while len(self._buffer) >= MESSAGE_PREFIX:
            length = int.from_bytes(self._buffer[1:5], "big")
            if length > self.max_message:
                raise GrpcFramingError(f"message of {length} bytes exceeds {self.max_message}")
            if len(self._buffer) < MESSAGE_PREFIX + length:
                break
            out.append(Message(bool(self._buffer[0]), bytes(self._buffer[5 : 5 + length])))
            del self._buffer[: MESSAGE_PREFIX + length]
        return out

    @property
    def pending(self) -> int:
        return len(self._buffer)


def percent_encode(text: str) -> str:
    """grpc-message encoding: UTF-8, bytes outside 0x20..0x7E and '%' become %XX."""
    out = []
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def percent_decode(text: str) -> str:
    raw = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%" and _is_hex(text[i + 1 : i + 3]):
            raw.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            raw += text[i].encode("utf-8")
            i += 1
    return raw.decode("utf-8", "replace")


def _is_hex(text: str) -> bool:
    return len(text) == 2 and all(c in "0123456789abcdefABCDEF" for c in text)


def denied_trailers_only(message: str = "Access denied") -> tuple[tuple[str, str], ...]:
    """The trailers-only response of a call the policy denied (gRPC status 7)."""
    return (
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", str(PERMISSION_DENIED)),
        ("grpc-message", percent_encode(message)),
    )


def method_of(path: str) -> str:
    """'/pkg.Service/Method' for a gRPC :path (the path is the method; no query)."""
    return path.partition("?")[0]
