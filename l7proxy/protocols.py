"""Protocol hand-off: a registry of session factories and the first-bytes sniffer.

A factory is `make_session(ctx: ConnContext, first_bytes: bytes) -> asyncio.Protocol`.
The listener then does, in this order:
    session = make_session(ctx, first_bytes)
    transport.set_protocol(session)
    session.connection_made(transport)
    if first_bytes: session.data_received(first_bytes)
so a factory may look at `first_bytes` but must not consume them.

Built-in names resolve lazily to `<module>:make_session` so the HTTP/2 and Kafka sessions plug in
by living at the path below (or by calling `register()` at import time).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_LAZY = {
    "http": "l7proxy.http1.session",
    "http2": "l7proxy.http2.session",
    "kafka": "l7proxy.kafka.session",
}
_FACTORIES: dict[str, Callable] = {}

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_HTTP_METHODS = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
)
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# Enough bytes to tell the three apart; a client that sends fewer and waits gets HTTP/1.
SNIFF_BYTES = len(H2_PREFACE)
MAX_KAFKA_API_KEY = 100
MAX_KAFKA_SNIFF_FRAME = 64 * 1024 * 1024


def register(name: str, factory: Callable) -> None:
    _FACTORIES[name] = factory


def factory_for(name: str) -> Callable:
    factory = _FACTORIES.get(name)
    if factory is None:
        module = _LAZY.get(name)
        if module is None:
            raise LookupError(f"no protocol session registered for {name!r}")
        factory = importlib.import_module(module).make_session
        _FACTORIES[name] = factory
    return factory


def available() -> list[str]:
    return sorted(set(_LAZY) | set(_FACTORIES))


def make_session(name: str, ctx, first_bytes: bytes = b""):
    return factory_for(name)(ctx, first_bytes)


def sniff(data: bytes) -> str | None:
    """ "http", "http2", "kafka", or None when more bytes are needed. Raises ValueError when the
    bytes can be none of them."""
    if H2_PREFACE.startswith(data[: len(H2_PREFACE)]):
        return "http2" if len(data) >= len(H2_PREFACE) else None
    # HTTP/1: a method token then a space. Kafka's first byte is the high byte of a 4-byte
    # length, which is 0 for any sane frame; 0 is never a token character.
    if data[:1] and data[0] in _TOKEN:
        space = data.find(b" ", 0, 24)
        if space > 0 and all(c in _TOKEN for c in data[:space]):
            return "http"
        if space < 0 and len(data) < 24 and all(c in _TOKEN for c in data):
            return None
        if any(m.startswith(data[:8]) for m in _HTTP_METHODS):
            return None
        raise ValueError("not HTTP/1, HTTP/2 or Kafka")
    if len(data) < 8:
        return None
    length = int.from_bytes(data[0:4], "big", signed=True)
    api_key = int.from_bytes(data[4:6], "big", signed=True)
    api_version = int.from_bytes(data[6:8], "big", signed=True)
    if (
        8 <= length <= MAX_KAFKA_SNIFF_FRAME
        and 0 <= api_key < MAX_KAFKA_API_KEY
        and 0 <= api_version < 100
    ):
        return "kafka"
    raise ValueError("not HTTP/1, HTTP/2 or Kafka")
