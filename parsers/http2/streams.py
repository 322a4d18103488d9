"""The relay's per-stream state and its memoized request evaluations.

A stream has an entry in the relay's table only while one of its sides is not done:

| kind      | created by                  | client side ends on           | server side ends on           |
|-----------|-----------------------------|-------------------------------|-------------------------------|
| forwarded | request HEADERS, allowed    | END_STREAM, or RST either way | END_STREAM, or RST either way |
| denied    | request HEADERS, denied     | END_STREAM or RST (its DATA is dropped and credited) | (never open) |

A denied stream whose local 403 body waits for flow-control window also stays until it is sent.
Frames for IDs at or below the highest client stream that have no entry belong to closed streams:
DATA is dropped and credited, HEADERS with pseudo-headers is a stream-ID reuse (PROTOCOL_ERROR).
"""

from __future__ import annotations

# What the policy (or the limits) made of one request header block.
ALLOW, DENY, TOO_LARGE, MALFORMED, BAD_TARGET = range(5)  # BAD_TARGET: a 400 (:path)


class Stream:
    """One client-initiated stream the relay still tracks."""

    __slots__ = ("forwarded", "client_open", "server_open", "status", "body", "window", "discarded")

    def __init__(self, forwarded: bool, client_open: bool) -> None:
        self.forwarded = forwarded
        self.client_open = client_open  # the client may still send on it
        self.server_open = forwarded  # the server (or the proxy's local answer) is not done
        self.status = 0  # final response status once the server's response head came
        self.body = b""  # a local response body waiting for flow-control window
        self.window = 0
        self.discarded = 0  # request body bytes of a denied stream dropped so far


class Evaluation:
    """The memoized evaluation of one request header block."""

    __slots__ = ("kind", "request", "decision", "block", "reason")

    def __init__(self, kind, request=None, decision=None, block=b"", reason="") -> None:
        self.kind = kind
        self.request = request
        self.decision = decision
        self.block = block
        self.reason = reason
