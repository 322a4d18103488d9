"""h11 as the strict oracle for the differential tests, and the request mutator for fuzzing."""

from __future__ import annotations

import random

import h11

from parsers.http1 import (
    Data,
    EndOfMessage,
    ParseError,
    Request,
    RequestParser,
    Upgrade,
    head_bytes,
)

BASES = [
    b"GET /public/index.html HTTP/1.1\r\nHost: web\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"POST /up HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /up HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n",
    b"PUT /a?b=c HTTP/1.0\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
    b"DELETE /x HTTP/1.1\r\nHost: a:80\r\nX-Empty:\r\nX-Tab: a\tb\r\n\r\n",
]
INTERESTING = b" \t\r\n:;,\x00\x01\x7f\x80\xff0aZ-/"


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            del buf[min(pos, len(buf) - 1)]
        elif op == 1:
            buf.insert(pos, rng.choice(INTERESTING))
        elif op == 2 and buf:
            buf[min(pos, len(buf) - 1)] = rng.choice(INTERESTING)
        elif op == 3:
            line = rng.choice(
                [b"Content-Length: 3\r\n", b"Transfer-Encoding: chunked\r\n", b"Host: b\r\n",
                 b"Transfer-Encoding: gzip\r\n", b" folded\r\n", b"X : y\r\n",
                 b"Content-Length: 5\r\n"]
            )  # fmt: skip
            eol = buf.find(b"\r\n", pos)
            if eol >= 0:
                buf[eol + 2 : eol + 2] = line
        elif op == 4:
            buf[pos:pos] = rng.choice([b"\r", b"\n", b"\r\n", b"0\r\n\r\n"])
        else:
            cut = rng.randrange(len(buf) + 1)
            buf = buf[:cut] + buf[cut:][: rng.randrange(len(buf) - cut + 1)]
    return bytes(buf)


def ours(raw: bytes):
    """The first complete request as (method, target, version, headers, body, trailers), or
    "error", or None when incomplete. Our parser is fed in two pieces to exercise resumption."""
    parser = RequestParser()
    cut = len(raw) // 2
    events = parser.receive_data(raw[:cut]) + parser.receive_data(raw[cut:])
    head, body = None, b""
    for ev in events:
        if isinstance(ev, ParseError):
            return "error"
        if isinstance(ev, Request):
            head = ev
            assert ev.head_len == len(head_bytes(ev)), ev  # the fast path relies on it
        elif isinstance(ev, Data):
            body += ev.data
        elif isinstance(ev, Upgrade):
            return None
        elif isinstance(ev, EndOfMessage):
            headers = tuple((n.lower(), v) for n, v in head.headers)
            trailers = tuple((n.lower(), v) for n, v in ev.trailers)
            return head.method, head.target, head.version, headers, body, trailers
    return None


def oracle(raw: bytes):
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    head, body = None, b""
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return None
            if isinstance(ev, h11.Request):
                head = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                headers = tuple((n, v) for n, v in head.headers.raw_items())
                headers = tuple((n.lower(), v) for n, v in headers)
                trailers = tuple((n.lower(), v) for n, v in ev.headers.raw_items())
                return head.method, head.target, head.http_version, headers, body, trailers
    except h11.RemoteProtocolError:
        return "error"


def disagreement(raw: bytes):
    """None when acceptable: both reject, we reject what h11 accepts (stricter is fine), or both
    accept the same thing. Otherwise a description of what we accepted that h11 does not."""
    mine = ours(raw)
    if mine in ("error", None):
        return None
    # Accepted normalisations, both unambiguous since the head is rebuilt before forwarding:
    # leading empty lines are skipped (RFC 9112 2.2) and runs of SP in the request line are one.
    raw = raw.lstrip(b"\r\n")
    line, sep, rest = raw.partition(b"\r\n")
    while b"  " in line:
        line = line.replace(b"  ", b" ")
    theirs = oracle(line + sep + rest)
    if theirs == "error":
        return f"we accepted, h11 rejected: {raw!r}"
    if theirs is None:
        return f"we completed a request h11 still waits on: {raw!r}"
    if mine != theirs:
        return f"different reading: {raw!r}\n ours={mine}\n h11={theirs}"
    return None
