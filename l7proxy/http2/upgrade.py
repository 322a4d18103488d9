"""h2c Upgrade from HTTP/1.1 (RFC 7540 section 3.2): the HTTP/1 session hands the connection over.

The HTTP/1 session calls `take_over_h2c` when a request carries `Upgrade: h2c` and one
`HTTP2-Settings` header, INSTEAD of forwarding it (the upstream is spoken to in HTTP/2 with prior
knowledge: HTTP/2 stays HTTP/2 upstream, and h2c Upgrade is rarely implemented by servers).
It must have read the whole request body first (RFC 7540: the upgrade happens after the request).

`take_over_h2c` writes the 101, moves the transport to a new `H2Session` and replays the
request as stream 1 (half-closed by the client): the policy decides it like any HTTP/2 request.
Anything the client already sent after the request (usually its connection preface) is `rest`.
Returns the session, or None when the upgrade is not acceptable (the caller then serves the request
as plain HTTP/1.1, which RFC 7540 allows: a server may ignore Upgrade).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

from l7proxy.http2.session import H2Session
from parsers.http2 import upgrade_request_headers

SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"


def wants_h2c(headers: Sequence[tuple[str, str]]) -> bool:
    """True for a request asking for `Upgrade: h2c` with exactly one HTTP2-Settings."""
    upgrade = [v for n, v in headers if n.lower() == "upgrade"]
    settings = [v for n, v in headers if n.lower() == "http2-settings"]
    tokens = {t.strip().lower() for v in upgrade for t in v.split(",")}
    return "h2c" in tokens and len(settings) == 1


def decode_http2_settings(value: str) -> bytes | None:
    """The SETTINGS payload carried base64url-encoded (no padding) in HTTP2-Settings."""
    value = value.strip()
    try:
        payload = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (binascii.Error, ValueError):
        return None
    return payload if len(payload) % 6 == 0 else None


def take_over_h2c(
    ctx,
    transport,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes = b"",
    rest: bytes = b"",
    previous=None,
) -> H2Session | None:
    """Switch `transport` to HTTP/2 with the upgraded request as stream 1 (see module doc).

    `previous` is the HTTP/1 session giving the transport up: it is removed from the deadline
    sweeper and must not touch the transport again. Metrics move from "http" to "http2"."""
    if not wants_h2c(headers):
        return None
    payload = decode_http2_settings(next(v for n, v in headers if n.lower() == "http2-settings"))
    if payload is None:
        return None
    sweeper = ctx.sweeper
    if previous is not None and sweeper is not None:
        sweeper.discard(previous)
    ctx.proto_metrics.active.dec()
    ctx.for_proto("http2")
    ctx.proto_metrics.accepted.inc()
    ctx.proto_metrics.active.inc()
    session = H2Session(ctx)
    transport.set_protocol(session)
    session.connection_made(transport)
    transport.write(SWITCHING)
    session.start_upgraded(upgrade_request_headers(method, target, headers), body, payload)
    if rest:
        session.data_received(rest)
    return session
