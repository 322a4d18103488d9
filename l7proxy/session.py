"""The contract every protocol session (HTTP/1, HTTP/2, Kafka) keeps with the core.

A session is the asyncio protocol of one client connection after the hand-off (see
l7proxy/protocols.py). The core needs four things from it, and uses only these:

- Client read pausing. A session stops reading its client for several independent reasons at
  once (the upstream's buffer is full, too many requests are waiting, the upstream is still
  connecting...). Each reason is a `PauseReason` bit in `paused`; reading resumes when the last
  one is released.
- One deadline. `deadline` (monotonic seconds) and `deadline_kind` (`NO_DEADLINE` = none; the
  other kinds are the session's own) are read by the worker's `DeadlineSweeper`
  (l7proxy/server.py), which calls `on_deadline()` once `deadline` has passed: one periodic pass
  over all sessions instead of a timer per request.
- `drain()`: SIGTERM. Take no new request, finish what is in flight, then close.
- `close()`: close now (the end of a drain that ran out of time).

`drain_sessions` is the one drain loop, shared by the gateway and the agent.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Collection

from l7proxy.log import log

NO_DEADLINE = 0
# How often a drain looks whether the sessions it waits for have all closed.
DRAIN_POLL = 0.05


class PauseReason(enum.IntFlag):
    """Why a session is not reading its client. `Session.paused` holds them as a plain int."""

    # The upstream's write buffer passed the high water mark.
    UPSTREAM_FULL = 1
    # The client's write buffer passed the high water mark: it does not read its answers, and
    # what it sends would make more of them (HTTP/2 PING ACKs and 403s, Kafka denials).
    CLIENT_FULL = 2
    # The upstream connection is being opened, or more than the high water mark waits for it.
    CONNECTING = 4
    # Too many requests wait for their answers (HTTP/1 pipelining, Kafka requests in flight), or
    # a request body is held behind them, or the request read last closes the connection.
    REQUEST_QUEUE = 8
    # HTTP/1: what follows an Upgrade request is held until the upstream answers it.
    UPGRADE = 16
    # Kafka: splice(2) is moving a request body from the client socket itself.
    SPLICE = 32
    # Kafka: a request waits for topic ids to be looked up with the broker.
    TOPIC_IDS = 64


class Session(asyncio.Protocol):
    """Base of the protocol sessions. Subclasses set `transport` (the client's) in
    `connection_made`, set `closed` once they closed it, and implement `on_deadline`, `drain`
    and `close`. Slotted, so a subclass with `__slots__` stays dict-free."""

    __slots__ = ("transport", "paused", "closed", "deadline", "deadline_kind")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused = 0  # PauseReason bits, as a plain int (int ops, not enum ops)
        self.closed = False
        self.deadline = 0.0
        self.deadline_kind = NO_DEADLINE

    def pause_client_reading(self, reason: PauseReason) -> None:
        paused = self.paused
        if not paused and not self.closed:
            self.transport.pause_reading()
        self.paused = paused | int(reason)

    def resume_client_reading(self, reason: PauseReason) -> None:
        bits = int(reason)
        paused = self.paused
        if paused & bits:
            paused = self.paused = paused & ~bits
            if not paused and not self.closed:
                self.transport.resume_reading()

    def on_deadline(self) -> None:
        """`deadline` has passed (called by the sweeper while `deadline_kind` is set)."""
        raise NotImplementedError

    def drain(self) -> None:
        """Stop taking new requests, finish those in flight, then close."""
        raise NotImplementedError

    def close(self) -> None:
        """Close the connection now."""
        raise NotImplementedError


class SessionStateError(RuntimeError):
    """An input a session's state table does not have in the state it is in: a bug in that
    session (the event loop then closes its connection, never the worker)."""


def next_state(table: dict, state: enum.Enum, event: enum.Enum, protocol: str) -> enum.Enum:
    """The state `table` (a session's one transition table) gives for `event` in `state`."""
    try:
        return table[state, event]
    except KeyError:
        raise SessionStateError(f"{protocol} session: {event.value} while {state.name}") from None


async def drain_sessions(sessions: Collection[Session], seconds: float) -> int:
    """Ask every session to drain, wait up to `seconds` for them to close (`sessions` is a live
    collection that closing sessions leave, such as the sweeper's set), then close the rest.
    Returns how many had to be closed. One failing session never stops the drain."""
    for session in list(sessions):
        try:
            session.drain()
        except Exception as exc:
            log(f"drain failed: {exc!r}")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while sessions and loop.time() < deadline:
        await asyncio.sleep(DRAIN_POLL)
    left = list(sessions)
    for session in left:
        try:
            session.close()
        except Exception as exc:
            log(f"close failed: {exc!r}")
    return len(left)
