"""The HTTP/2 session's state table (l7proxy/http2/states.py) and the session moving through it."""

import pytest

from l7proxy.config import ProxyConfig
from l7proxy.http2.session import H2Session
from l7proxy.http2.states import TRANSITIONS, Input, State
from l7proxy.session import NO_DEADLINE, SessionStateError, next_state
from tests.unit.http2.harness import session_ctx

OPEN, CLOSING, CLOSED = State


class _Transport:
    def __init__(self) -> None:
        self.closed = self.aborted = False
        self.out = bytearray()

    def set_write_buffer_limits(self, *a) -> None:
        pass

    def write(self, data) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def _session() -> tuple[H2Session, _Transport]:
    session = H2Session(session_ctx(config=ProxyConfig(h2_close_grace=3)))
    transport = _Transport()
    session.connection_made(transport)
    return session, transport


def test_closed_is_final_and_every_state_is_reached():
    assert {TRANSITIONS[k] for k in TRANSITIONS} | {OPEN} == set(State)  # OPEN: the start
    assert all(TRANSITIONS[k] is CLOSED for k in TRANSITIONS if k[0] is CLOSED)
    with pytest.raises(SessionStateError, match="close while CLOSED"):
        next_state(TRANSITIONS, CLOSED, Input.CLOSE, "HTTP/2")


def test_a_close_waits_out_its_grace_then_aborts():
    session, transport = _session()
    assert session.state is OPEN and not session.closed
    session.close()
    assert session.state is CLOSING and session.closed and transport.closed
    assert session.deadline_kind != NO_DEADLINE and not transport.aborted
    session.close()  # again: nothing more happens
    assert session.state is CLOSING
    session.on_deadline()  # the client did not read what was left within h2_close_grace
    assert transport.aborted and session.state is CLOSED and session.deadline_kind == NO_DEADLINE
    session.connection_lost(None)
    assert session.state is CLOSED


def test_the_client_going_away_closes_at_once():
    session, transport = _session()
    session.connection_lost(None)
    assert session.state is CLOSED and session.closed and session.deadline_kind == NO_DEADLINE
