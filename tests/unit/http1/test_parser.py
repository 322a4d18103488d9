import pytest

from parsers.http1 import (
    Data,
    EndOfMessage,
    ParseError,
    Request,
    RequestParser,
    Response,
    ResponseEnd,
    ResponseParser,
    Upgrade,
    build_head,
    encode_chunk,
    head_bytes,
    last_chunk,
    simple_response,
)


def kinds(events):
    return [type(e).__name__ for e in events]


def test_pipelined_requests_and_rebuilt_head():
    p = RequestParser()
    ev = p.receive_data(
        b"GET /a HTTP/1.1\r\nHost: x\r\nX-Pad: v  \r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert kinds(ev) == ["Request", "EndOfMessage", "Request", "EndOfMessage"]
    assert head_bytes(ev[0]) == b"GET /a HTTP/1.1\r\nHost: x\r\nX-Pad: v\r\n\r\n"
    assert ev[0].head_len == len(head_bytes(ev[0])) and ev[2].head_len == len(head_bytes(ev[2]))
    assert ev[0].host == b"x" and ev[1].keep_alive and ev[2].target == b"/b"
    assert p.idle


def test_byte_by_byte_feeding_gives_the_same_events():
    raw = (
        b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"
    )
    p = RequestParser()
    events = []
    for i in range(len(raw)):
        events += p.receive_data(raw[i : i + 1])
    head = events[0]
    assert isinstance(head, Request) and head.chunked and head.has_body
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"abcde"
    assert events[-1] == EndOfMessage(((b"X-Sum", b"5"),), True)


def test_in_head_and_expect_continue():
    p = RequestParser()
    assert p.receive_data(b"PUT /x HTTP/1.1\r\nHost: a\r\n") == []
    assert p.in_head
    (req,) = p.receive_data(b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert req.expect_continue and req.has_body and not p.in_head
    assert kinds(p.receive_data(b"ok")) == ["Data", "EndOfMessage"]


@pytest.mark.parametrize(
    "raw,status",
    [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nxyz\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 400),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX\x7f: b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),
        (b"GE(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 70_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 70_000, 431),  # still incomplete
        (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 102, 431),
        (b"GET /" + b"u" * 9000 + b" HTTP/1.1\r\n", 414),
    ],
)
def test_hardening_errors_carry_the_status_to_answer(raw, status):
    p = RequestParser()
    events = p.receive_data(raw)
    assert isinstance(events[-1], ParseError), events
    assert events[-1].status == status
    assert p.failed and p.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []


def test_limits_are_configurable():
    p = RequestParser(max_header_bytes=100, max_header_count=2, max_uri_bytes=10)
    assert p.receive_data(b"GET /0123456789a HTTP/1.1\r\n")[-1].status == 414
    p = RequestParser(max_header_count=2)
    assert p.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nB: 1\r\nC: 2\r\n\r\n")[-1].status == 431


def test_slowly_growing_header_is_caught_before_it_completes():
    p = RequestParser(max_header_bytes=1000)
    assert p.receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nX: ") == []
    events = []
    for _ in range(20):
        events += p.receive_data(b"v" * 100)
    assert events and events[-1].status == 431


def test_upgrade_stops_and_resume_continues_http():
    p = RequestParser()
    ev = p.receive_data(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nRAW"
    )
    assert kinds(ev) == ["Request", "EndOfMessage", "Upgrade"] and ev[0].upgrade
    assert ev[-1] == Upgrade(b"RAW")
    assert p.receive_data(b"more") == []
    assert kinds(p.resume(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")) == ["Request", "EndOfMessage"]
    ev = RequestParser().receive_data(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
    assert ev[0].method == b"CONNECT" and ev[0].upgrade and isinstance(ev[-1], Upgrade)


def test_http10_and_connection_close_are_not_keep_alive():
    assert not RequestParser().receive_data(b"GET / HTTP/1.0\r\n\r\n")[-1].keep_alive
    ev = RequestParser().receive_data(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert not ev[-1].keep_alive


def test_response_parser_boundaries():
    r = ResponseParser(report_heads=True)
    r.expect(b"GET")
    assert r.receive_data(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nab"
    ) == [Response(100), Response(200)]
    assert r.receive_data(b"c") == [ResponseEnd(200, True)]
    r.expect(b"HEAD")
    assert r.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n") == [
        Response(200),
        ResponseEnd(200, True),
    ]
    r.expect(b"GET")
    assert r.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")[-1] == ResponseEnd(204, True)
    assert r.receive_data(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")[
        -1
    ] == ResponseEnd(200, True)
    assert r.receive_data(b"HTTP/1.1 101 Switching\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")[
        -1
    ] == Upgrade(b"")
    assert r.tunnel
    fast = ResponseParser()  # without heads: one callback per response
    assert fast.receive_data(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 No\r\nContent-Length: 0\r\n\r\n"
    ) == [ResponseEnd(404, True)]
    c = ResponseParser()
    c.expect(b"CONNECT")
    assert c.receive_data(b"HTTP/1.1 200 Connection established\r\n\r\nserver-first")[-1] == (
        Upgrade(b"")
    )
    bad = ResponseParser()
    assert bad.receive_data(b"HTTP/1.1 2x0 OK\r\n\r\n") == [] and bad.error
    close = ResponseParser()
    assert close.receive_data(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
    )[-1] == ResponseEnd(200, False)


def test_response_memo_gives_the_parsers_events_and_never_more(monkeypatch):
    import parsers.http1 as http1

    monkeypatch.setattr(http1, "_RESPONSE_MEMO", {})
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    end = len(head) - 4
    r = ResponseParser()
    assert r.receive_data(head + b"abc", end) == [ResponseEnd(200, True)]
    assert http1._RESPONSE_MEMO[head][0] == 3  # learnt: it ended at the read's last byte
    # A hit: the same head and length, any body bytes (Content-Length is only counted).
    llhttp, r._parser = r._parser, None  # would fail if it were fed
    assert r.receive_data(head + b"xyz", end) == [ResponseEnd(200, True)]
    r._parser = llhttp
    assert r.receive_data(head + b"abcd", end) == [ResponseEnd(200, True)]  # another length
    assert r.error and "abcd" not in str(http1._RESPONSE_MEMO)  # parsed: a stray byte after it
    monkeypatch.undo()
    monkeypatch.setattr(http1, "_RESPONSE_MEMO", {head: (3, ResponseEnd(200, True))})
    # Not exactly one response: the strict parser decides (here: a second, broken one follows).
    r = ResponseParser()
    assert r.receive_data(head + b"abcHTTP/1.1 2x0\r\n\r\n", end) == [ResponseEnd(200, True)]
    assert r.error
    # Mid-message: the parser is not at rest, so a read that looks like a known head is parsed.
    r = ResponseParser()
    assert r.receive_data(b"HTTP/1.1 404 No\r\nContent-Length: 5\r\n\r\nab", 34) == []
    # ("HTT" ends the 404's body; what follows is no response.)
    assert r.receive_data(head + b"abc", end) == [ResponseEnd(404, True)] and r.error
    # A chunked head is never remembered: its body's bytes decide where it ends.
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    r = ResponseParser()
    assert r.receive_data(chunked + b"0\r\n\r\n", len(chunked) - 4) == [ResponseEnd(200, True)]
    assert chunked not in http1._RESPONSE_MEMO
    # HEAD: the body length the head announces never follows, the memo is not used.
    r = ResponseParser()
    r.expect(b"HEAD")
    assert r.receive_data(head, end) == [ResponseEnd(200, True)]


def test_serialisers():
    assert (
        build_head(b"GET", b"/", b"1.1", [(b"Host", b"a")]) == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert b"".join(encode_chunk(b"hello")) == b"5\r\nhello\r\n"
    assert last_chunk([(b"X", b"1")]) == b"0\r\nX: 1\r\n\r\n"
    assert simple_response(403, b"Access denied\r\n") == (
        b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n\r\n"
        b"Access denied\r\n"
    )


def test_not_idle_once_the_next_message_has_begun():
    p = RequestParser()
    assert len(p.receive_data(b"GET /x HTTP/1.1\r\nHost: h\r\n\r\nGE")) == 2
    assert not p.idle
    assert [type(e).__name__ for e in p.receive_data(b"T /y HTTP/1.1\r\nHost: h\r\n\r\n")] == [
        "Request",
        "EndOfMessage",
    ]
    assert p.idle
