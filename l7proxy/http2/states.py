"""The states of an HTTP/2 client connection, and the one table of their transitions.

Everything about streams lives in the sans-IO relay (parsers/http2); the session itself is only
`OPEN` (relaying, its deadline the 1-second tick), `CLOSING` (the proxy closed it: what is
buffered, GOAWAY included, is still being written, and a client that does not read it is aborted
after `h2_close_grace`) or `CLOSED`. `H2Session._to(input)` is the only place that changes it;
an input the table does not have in a state raises `l7proxy.session.SessionStateError`.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    OPEN = 0
    CLOSING = 1
    CLOSED = 2


class Input(enum.Enum):
    CLOSE = "close"  # the proxy ends the connection after what is buffered
    ABORT = "abort"  # at once: a bug in this connection, or the close grace ran out
    LOST = "lost"  # the transport is gone


OPEN, CLOSING, CLOSED = State
CLOSE, ABORT, LOST = Input

TRANSITIONS: dict[tuple[State, Input], State] = {
    (OPEN, CLOSE): CLOSING,
    (OPEN, ABORT): CLOSED,
    (OPEN, LOST): CLOSED,
    (CLOSING, ABORT): CLOSED,
    (CLOSING, LOST): CLOSED,
    (CLOSED, LOST): CLOSED,
    # A failure while handling what arrived with the close (the abort must not fail too).
    (CLOSED, ABORT): CLOSED,
}
