"""The HTTP/1 session's state table (l7proxy/http1/states.py) and the session moving through it."""

import pytest

from l7proxy.http1.states import TRANSITIONS, Input, State
from l7proxy.session import SessionStateError, next_state
from tests.unit.http1.playbook import Play

OPEN, DRAINING, UPGRADING, UPGRADING_DRAINING, TUNNEL, HANDED_OFF, CLOSED = State

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UPGRADE = b"GET /public/ws HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_every_state_is_reached_and_only_closed_and_handed_off_are_final():
    reached = {OPEN}
    frontier = [OPEN]
    while frontier:
        state = frontier.pop()
        for event in Input:
            nxt = TRANSITIONS.get((state, event))
            if nxt is not None and nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)
    assert reached == set(State)
    for state in State:
        leaves = {TRANSITIONS[k] for k in TRANSITIONS if k[0] is state} - {state}
        assert bool(leaves) == (state not in (CLOSED, HANDED_OFF)), state


def test_speaking_http_is_the_first_two_states():
    # The session tests `state <= DRAINING` for "speaks HTTP" (one comparison on the hot path).
    assert [s for s in State if s <= DRAINING] == [OPEN, DRAINING]


def test_an_input_the_table_does_not_have_is_an_error():
    with pytest.raises(SessionStateError, match="upgrade while TUNNEL"):
        next_state(TRANSITIONS, TUNNEL, Input.UPGRADE, "HTTP/1")
    with pytest.raises(SessionStateError):
        next_state(TRANSITIONS, OPEN, Input.REFUSED, "HTTP/1")  # no upgrade was waiting


def test_drain_during_an_upgrade_is_kept_when_the_upstream_refuses_it():
    p = Play()
    p.client_sends(UPGRADE + b"GET /public/b HTTP/1.1\r\nHost: w\r\n\r\n")
    assert p.session.state is UPGRADING and not p.client.reading
    p.session.drain()
    assert p.session.state is UPGRADING_DRAINING and not p.client.closed
    p.upstream_got()
    p.upstream_sends(OK)  # refused: the held request is HTTP again, and the drain goes on
    assert p.session.state is DRAINING
    assert p.upstream_got() == b"GET /public/b HTTP/1.1\r\nHost: w\r\n\r\n"
    p.upstream_sends(OK)
    assert p.client_got() == OK + OK and p.client.closed and p.session.state is CLOSED


def test_a_tunnel_is_not_drained_and_has_no_deadline():
    p = Play()
    p.client_sends(UPGRADE)
    p.upstream_sends(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert p.session.state is TUNNEL and p.session.deadline_kind == 0
    p.session.drain()
    assert p.session.state is TUNNEL and not p.client.closed
    p.client_sends(b"raw")
    assert p.upstream_got().endswith(b"raw")
    p.session.close()
    assert p.session.state is CLOSED and p.session.closed and p.client.closed


def test_a_session_in_an_impossible_state_fails_loudly():
    p = Play()
    with pytest.raises(SessionStateError):
        p.session._to(Input.REFUSED)
    assert p.session.state is OPEN  # the state is not changed by a refused input


def test_a_refused_upgrade_forwards_the_request_held_behind_it_once():
    p = Play()
    p.client_sends(UPGRADE + b"GET /public/b HTTP/1.1\r\nHost: w\r\n\r\n")
    p.upstream_got()
    p.upstream_sends(OK)
    assert p.session.state is OPEN and p.client.reading
    assert p.upstream_got() == b"GET /public/b HTTP/1.1\r\nHost: w\r\n\r\n"  # (it went twice)
    p.upstream_sends(OK)
    assert p.client_got() == OK + OK and not p.client.closed and not p.session.queue


def test_an_upgrade_the_upstream_fails_is_answered_and_http_goes_on():
    p = Play()
    p.client_sends(UPGRADE + b"GET /public/b HTTP/1.1\r\nHost: w\r\n\r\n")
    first = p.up
    p.upstream_got()
    first.connection_lost(ConnectionResetError())  # before any byte of an answer: 503
    assert p.client_got().startswith(b"HTTP/1.1 503 Service Unavailable")
    # The held request is HTTP again (it once stayed held, the client paused, until idle).
    assert p.session.state is OPEN and p.client.reading
    assert p.up is not first
    assert p.upstream_got() == b"GET /public/b HTTP/1.1\r\nHost: w\r\n\r\n"
    p.upstream_sends(OK)
    assert p.client_got() == OK


# An h2c Upgrade the proxy can't take over itself (pipelined behind another request, or with a
# body) used to be forwarded as it came: an upstream that speaks h2c (Go's x/net/http2/h2c)
# answered 101 and the connection became a raw tunnel, so every later HTTP/2 request on it
# reached the upstream unjudged (`GET /admin` served through a `GET /public/.*` policy). The
# proxy now strips the h2c offer from what it forwards (as Envoy does): the upstream answers in
# HTTP/1.1 and the connection stays HTTP/1, judged request by request.
H2C_UPGRADE = (
    b"GET /public/up HTTP/1.1\r\nHost: w\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
)


def test_a_pipelined_h2c_upgrade_reaches_the_upstream_without_its_h2c_offer():
    p = Play()
    p.client_sends(b"GET /public/a HTTP/1.1\r\nHost: w\r\n\r\n" + H2C_UPGRADE + b"\r\n")
    assert p.upstream_got() == b"GET /public/a HTTP/1.1\r\nHost: w\r\n\r\n"
    p.upstream_sends(OK)
    sent = p.upstream_got()
    assert sent.startswith(b"GET /public/up HTTP/1.1\r\n"), sent
    assert b"h2c" not in sent.lower() and b"http2-settings" not in sent.lower(), sent
    p.upstream_sends(OK)
    assert p.client_got() == OK + OK
    assert p.session.state is OPEN and p.client.reading


def test_an_h2c_upgrade_with_a_body_reaches_the_upstream_without_its_h2c_offer():
    p = Play()
    p.client_sends(H2C_UPGRADE + b"Content-Length: 2\r\n\r\nhi")
    # (What follows the head of an Upgrade request is held until the upstream answers, as for
    # any Upgrade; the point here is the head.)
    assert p.upstream_got() == b"GET /public/up HTTP/1.1\r\nHost: w\r\nContent-Length: 2\r\n\r\n"


def test_an_upgrade_offering_websocket_and_h2c_keeps_only_websocket():
    p = Play()
    p.client_sends(
        b"GET /public/a HTTP/1.1\r\nHost: w\r\n\r\n"
        b"GET /public/ws HTTP/1.1\r\nHost: w\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c, websocket\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
    )
    p.upstream_got()
    p.upstream_sends(OK)
    assert p.upstream_got() == (
        b"GET /public/ws HTTP/1.1\r\nHost: w\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )


def test_an_h2c_offer_without_connection_upgrade_is_not_forwarded():
    # Go's h2c handler upgrades on `Upgrade: h2c` + `Connection: HTTP2-Settings` alone, which the
    # parser does not take for an upgrade: it went through as an ordinary request, Go answered
    # 101 and the session became a tunnel all the same.
    for connection in (b"HTTP2-Settings", b"keep-alive, HTTP2-Settings"):
        p = Play()
        head = (
            b"GET /public/up HTTP/1.1\r\nHost: w\r\nConnection: " + connection + b"\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        for _ in range(2):  # the second one is the remembered head
            p.client_sends(head)
            sent = p.upstream_got()
            assert sent.startswith(b"GET /public/up HTTP/1.1\r\nHost: w\r\n"), sent
            assert b"h2c" not in sent.lower() and b"http2-settings" not in sent.lower(), sent
            p.upstream_sends(OK)
            assert p.client_got() == OK
