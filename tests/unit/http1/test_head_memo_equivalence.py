"""The remembered-heads shortcut (l7proxy/http1/verdicts.py `recall`) never changes what a session
does: random request streams, cut into reads at random places (often exactly at request
boundaries, where the shortcut applies), give byte-identical transcripts with and without it."""

from __future__ import annotations

import random

import pytest

from l7proxy.http1 import session as session_mod
from tests.unit.http1.playbook import PathRules, Play

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

REQUESTS = [
    b"GET /public/a HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET /public/b HTTP/1.1\r\nHost: web\r\nX-A: 1\r\n\r\n",
    b"GET /secret HTTP/1.1\r\nHost: web\r\n\r\n",
    b"HEAD /public/a HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET /public/../secret HTTP/1.1\r\nHost: web\r\n\r\n",
    b"GET /public/a HTTP/1.0\r\nHost: web\r\nConnection: keep-alive\r\n\r\n",
    b"GET /public/c HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
    b"POST /public/u HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /public/a HTTP/1.1\r\nHost: web\r\nContent-Length: 3\r\n\r\nabc",
    b"GET /public/a HTTP/1.1\r\nHost: web\r\nHost: web\r\n\r\n",  # 400
    b"GET /public/a HTTP/1.1\r\nHost: web\r\n\r\nGE",  # ends inside the next method
    b"\r\n",
]


def _reads(rng: random.Random) -> list[bytes]:
    stream = [rng.choice(REQUESTS) for _ in range(rng.randint(1, 8))]
    reads: list[bytes] = []
    for item in stream:
        if rng.random() < 0.6:
            reads.append(item)  # exactly one request per read: the shortcut's case
        else:
            cut = rng.randint(1, len(item))
            reads += [item[:cut], item[cut:]] if cut < len(item) else [item]
    if rng.random() < 0.3 and len(reads) > 1:  # some pipelining
        i = rng.randrange(len(reads) - 1)
        reads[i : i + 2] = [reads[i] + reads[i + 1]]
    return reads


def _transcript(reads: list[bytes], rules) -> list:
    p = Play(rules)
    log: list = []
    for data in reads:
        if p.client.closed:
            break
        p.client_sends(data)
        for _ in range(10):  # answer whatever went upstream, one response per request head
            sent = p.upstream_got()
            if not sent:
                break
            log.append(("up", sent))
            for _ in range(sent.count(b" HTTP/1.")):
                if not p.up.closed:
                    p.upstream_sends(OK)
        log.append(("client", p.client_got(), p.client.closed))
    return log


@pytest.mark.parametrize("seed", range(300))
def test_same_transcript_with_and_without_remembered_heads(seed, monkeypatch):
    rng = random.Random(seed)
    rules = PathRules()
    warm = [r for r in REQUESTS if rng.random() < 0.7]
    _transcript(warm, rules)  # remember some heads under this rule set first
    reads = _reads(rng)
    with_memo = _transcript(reads, rules)
    monkeypatch.setattr(session_mod, "recall", lambda rules, head: None)
    without = _transcript(reads, rules)
    assert with_memo == without
