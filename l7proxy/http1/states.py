"""The states of an HTTP/1 client connection, and the one table of their transitions.

A connection speaks HTTP/1 (`OPEN`, or `DRAINING` after SIGTERM), waits for the upstream's answer
to an Upgrade or CONNECT it forwarded (`UPGRADING`, holding what the client sends meanwhile),
relays raw bytes once the upstream switched (`TUNNEL`), gave its transport to an HTTP/2 session
(`HANDED_OFF`, h2c) or is `CLOSED`. Draining is remembered across an upgrade that the upstream
refuses (`UPGRADING_DRAINING` goes back to `DRAINING`).

`Http1Session._to(input)` is the only place that changes the state; an input the table does not
have in a state is a bug in the session and raises `l7proxy.session.SessionStateError` (the
event loop then closes that connection, never the worker).

`OPEN` and `DRAINING` come first, `UPGRADING` and `UPGRADING_DRAINING` next: `state <= DRAINING`
is "speaks HTTP", which the hot path tests with one comparison.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    OPEN = 0
    DRAINING = 1  # the request in flight is the last one, then the connection closes
    UPGRADING = 2  # an allowed Upgrade/CONNECT went upstream; client bytes are held
    UPGRADING_DRAINING = 3
    TUNNEL = 4  # raw bytes both ways, until either side closes
    HANDED_OFF = 5  # the transport belongs to an HTTP/2 session (h2c)
    CLOSED = 6


class Input(enum.Enum):
    DRAIN = "drain"  # SIGTERM (the gateway's or the agent's drain)
    UPGRADE = "upgrade"  # the client's Upgrade/CONNECT request is allowed and forwarded
    REFUSED = "refused"  # the upstream answered it with an ordinary response
    SWITCHED = "switched"  # the upstream answered 101 (or 2xx to CONNECT)
    H2C = "h2c"  # an h2c Upgrade: an HTTP/2 session took the transport over
    CLOSE = "close"  # closed by the proxy or by the client


OPEN, DRAINING, UPGRADING, UPGRADING_DRAINING, TUNNEL, HANDED_OFF, CLOSED = State
DRAIN, UPGRADE, REFUSED, SWITCHED, H2C, CLOSE = Input

TRANSITIONS: dict[tuple[State, Input], State] = {
    (OPEN, DRAIN): DRAINING,
    (OPEN, UPGRADE): UPGRADING,
    # A 101 to a request the parser did not take for an upgrade (say, one with a body).
    (OPEN, SWITCHED): TUNNEL,
    (OPEN, H2C): HANDED_OFF,
    (OPEN, CLOSE): CLOSED,
    (DRAINING, DRAIN): DRAINING,
    (DRAINING, UPGRADE): UPGRADING_DRAINING,
    (DRAINING, SWITCHED): TUNNEL,
    (DRAINING, H2C): HANDED_OFF,
    (DRAINING, CLOSE): CLOSED,
    (UPGRADING, DRAIN): UPGRADING_DRAINING,
    (UPGRADING, REFUSED): OPEN,
    (UPGRADING, SWITCHED): TUNNEL,
    (UPGRADING, CLOSE): CLOSED,
    (UPGRADING_DRAINING, DRAIN): UPGRADING_DRAINING,
    (UPGRADING_DRAINING, REFUSED): DRAINING,
    (UPGRADING_DRAINING, SWITCHED): TUNNEL,
    (UPGRADING_DRAINING, CLOSE): CLOSED,
    # A tunnel is not drained: it runs until drain_time is up, then it is closed.
    (TUNNEL, DRAIN): TUNNEL,
    (TUNNEL, CLOSE): CLOSED,
    (HANDED_OFF, DRAIN): HANDED_OFF,
    # A drain may reach a session whose close is still under way (connection_lost comes later).
    (CLOSED, DRAIN): CLOSED,
    (CLOSED, CLOSE): CLOSED,
}
