"""The relay's per-stream state machine (one table) and its memoized request evaluations.

A client-initiated stream has an entry in the relay's table only while one of its sides is not
done. Its state is the relay's view of both sides; the table below is the only place that says
which event moves a stream from one state to the next (style rule 3). An event the table lacks
for the stream's state is a protocol error: a stream error STREAM_CLOSED when the client had
already ended its side, PROTOCOL_ERROR otherwise.

States (the "server side" of a denied stream is the proxy's local answer):

| state           | request went to | client may send | response still coming             |
|-----------------|-----------------|-----------------|-----------------------------------|
| OPEN            | the server      | yes             | from the server                   |
| CLIENT_DONE     | the server      | no              | from the server                   |
| SERVER_DONE     | the server      | yes             | no (the client still sends a body) |
| LOCAL_OPEN      | nowhere         | yes, dropped    | no (answered locally)             |
| LOCAL_BODY_OPEN | nowhere         | yes, dropped    | the local body waits for window   |
| LOCAL_BODY      | nowhere         | no              | the local body waits for window   |

CLOSED means the entry is removed. A stream without an entry is idle when its ID is above the
highest client stream ID seen, closed otherwise. For closed streams the relay remembers (bounded)
which ones the server or the proxy reset: DATA from the client may still be in flight on those and
is dropped and credited; DATA on any other closed stream is a stream error STREAM_CLOSED.
"""

from __future__ import annotations

# What the policy (or the limits) made of one request header block.
ALLOW, DENY, TOO_LARGE, MALFORMED, BAD_TARGET = range(5)  # BAD_TARGET: a 400 (:path)

# Stream states.
OPEN, CLIENT_DONE, SERVER_DONE, LOCAL_OPEN, LOCAL_BODY_OPEN, LOCAL_BODY, CLOSED = range(7)
STATE_NAMES = (
    "OPEN",
    "CLIENT_DONE",
    "SERVER_DONE",
    "LOCAL_OPEN",
    "LOCAL_BODY_OPEN",
    "LOCAL_BODY",
    "CLOSED",
)

# Events.
CLIENT_DATA = "client DATA"  # DATA without END_STREAM
CLIENT_END = "client END_STREAM"  # DATA or trailers with END_STREAM
CLIENT_HEADERS = "client HEADERS without END_STREAM"  # on an open stream: in no row
CLIENT_RESET = "client RST_STREAM"
SERVER_END = "server END_STREAM"
SERVER_RESET = "server RST_STREAM"
PROXY_RESET = "proxy RST_STREAM"  # a stream error the relay raised
BODY_SENT = "local body sent"

SERVER_EVENTS = frozenset({SERVER_END, SERVER_RESET})
_RESETS = (CLIENT_RESET, SERVER_RESET, PROXY_RESET)
_LOCAL_RESETS = (CLIENT_RESET, PROXY_RESET)  # the server never knew a local stream

TRANSITIONS: dict[tuple[int, str], int] = {
    (OPEN, CLIENT_DATA): OPEN,
    (OPEN, CLIENT_END): CLIENT_DONE,
    (OPEN, SERVER_END): SERVER_DONE,
    (CLIENT_DONE, SERVER_END): CLOSED,
    (SERVER_DONE, CLIENT_DATA): SERVER_DONE,
    (SERVER_DONE, CLIENT_END): CLOSED,
    (LOCAL_OPEN, CLIENT_DATA): LOCAL_OPEN,
    (LOCAL_OPEN, CLIENT_END): CLOSED,
    (LOCAL_BODY_OPEN, CLIENT_DATA): LOCAL_BODY_OPEN,
    (LOCAL_BODY_OPEN, CLIENT_END): LOCAL_BODY,
    (LOCAL_BODY_OPEN, BODY_SENT): LOCAL_OPEN,
    (LOCAL_BODY, BODY_SENT): CLOSED,
    **{(state, event): CLOSED for state in (OPEN, CLIENT_DONE, SERVER_DONE) for event in _RESETS},
    **{
        (state, event): CLOSED
        for state in (LOCAL_OPEN, LOCAL_BODY_OPEN, LOCAL_BODY)
        for event in _LOCAL_RESETS
    },
}

# The table read per event, {state: next state}, for the lookups on the hot paths (derived from
# TRANSITIONS, not a second source).
AFTER: dict[str, dict[int, int]] = {}
for (_state, _event), _next in TRANSITIONS.items():
    AFTER.setdefault(_event, {})[_state] = _next
AFTER_CLIENT_END = AFTER[CLIENT_END]
AFTER_SERVER_END = AFTER[SERVER_END]

# Derived sets the relay's loops test with one membership check.
FORWARDED = frozenset({OPEN, CLIENT_DONE, SERVER_DONE})  # the server knows the stream
CLIENT_FORWARDED = frozenset({OPEN, SERVER_DONE})  # the client's DATA goes to the server
CLIENT_SENDING = frozenset({OPEN, SERVER_DONE, LOCAL_OPEN, LOCAL_BODY_OPEN})
SERVER_SENDING = frozenset({OPEN, CLIENT_DONE})  # its response is still coming
BODY_WAITING = frozenset({LOCAL_BODY_OPEN, LOCAL_BODY})


def next_state(state: int, event: str) -> int | None:
    """The state after `event`, or None when the table has no such transition."""
    return TRANSITIONS.get((state, event))


class Stream:
    """One client-initiated stream the relay still tracks."""

    __slots__ = ("state", "status", "body", "window", "discarded", "remaining")

    def __init__(self, state: int, window: int, remaining: int = -1) -> None:
        self.state = state
        self.status = 0  # final response status once the server's response head came
        self.body = b""  # a local response body waiting for flow-control window
        # The client's receive window for this stream, as far as the relay can tell: its initial
        # window plus its WINDOW_UPDATEs minus the DATA relayed or sent to it (RFC 9113 6.9.1).
        self.window = window
        self.discarded = 0  # request body bytes of a denied stream dropped so far
        # Request body bytes still due by its content-length (-1: no content-length).
        self.remaining = remaining

    @property
    def forwarded(self) -> bool:
        return self.state in FORWARDED

    @property
    def client_open(self) -> bool:
        return self.state in CLIENT_SENDING


class Evaluation:
    """The memoized evaluation of one request header block."""

    __slots__ = ("kind", "request", "decision", "block", "reason")

    def __init__(self, kind, request=None, decision=None, block=b"", reason="") -> None:
        self.kind = kind
        self.request = request
        self.decision = decision
        self.block = block
        self.reason = reason
