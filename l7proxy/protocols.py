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

from l7proxy.config import ProxyConfig
from parsers.http2.frames import PREFACE as H2_PREFACE

_LAZY = {
    "http": "l7proxy.http1.session",
    "http2": "l7proxy.http2.session",
    "kafka": "l7proxy.kafka.session",
}
_FACTORIES: dict[str, Callable] = {}

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
# Kafka's request header: api keys end near 90 today, versions near 20.
MAX_KAFKA_API_KEY = 100
MAX_KAFKA_API_VERSION = 100
_DEFAULTS = ProxyConfig()


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


def sniff(data: bytes, max_kafka_frame: int = _DEFAULTS.sniff_max_kafka_frame) -> str | None:
    """ "http", "http2", "kafka", or None when more bytes are needed. Raises ValueError when the
    bytes can be none of them. A Kafka frame is taken as one up to `max_kafka_frame` bytes."""
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
        8 <= length <= max_kafka_frame
        and 0 <= api_key < MAX_KAFKA_API_KEY
        and 0 <= api_version < MAX_KAFKA_API_VERSION
    ):
        return "kafka"
    raise ValueError("not HTTP/1, HTTP/2 or Kafka")


def worker_upstreams(config: ProxyConfig):
    """What the sessions of one worker share towards their upstreams (`ctx.upstreams`): the
    HTTP/1 keep-alive pool. The gateway and the agent build it here, not from a protocol's
    module."""
    from l7proxy.http1.upstream import UpstreamPool

    return UpstreamPool(config.upstream_pool_size, config.upstream_connect_timeout)
