"""parsers/http_path.py: path normalization of request targets (the dot-segment bypass of issue
4/5, the escaped-slash class of issue 19), and the HTTP/1 session judging and forwarding the
normalized form."""

from __future__ import annotations

import pytest

from parsers.http_path import (
    ESCAPED_SLASH_MODES,
    KEEP,
    REJECT,
    UNESCAPE,
    BadTarget,
    normalize_target,
    normalize_target_bytes,
    remove_dot_segments,
    target_authority,
)
from tests.path_table import BAD, ROWS
from tests.unit.http1.playbook import Play

# RFC 3986 section 5.4 with base path /b/c/d;p: the merged path (section 5.2.3) of each relative
# reference, and the path of the resolved URI the RFC gives.
RFC_5_4 = [
    ("/b/c/g", "/b/c/g"),  # g
    ("/b/c/./g", "/b/c/g"),  # ./g
    ("/b/c/g/", "/b/c/g/"),  # g/
    ("/g", "/g"),  # /g
    ("/b/c/.", "/b/c/"),  # .
    ("/b/c/./", "/b/c/"),  # ./
    ("/b/c/..", "/b/"),  # ..
    ("/b/c/../", "/b/"),  # ../
    ("/b/c/../g", "/b/g"),  # ../g
    ("/b/c/../..", "/"),  # ../..
    ("/b/c/../../", "/"),  # ../../
    ("/b/c/../../g", "/g"),  # ../../g
    ("/./g", "/g"),  # /./g (abnormal)
    ("/b/c/g.", "/b/c/g."),
    ("/b/c/.g", "/b/c/.g"),
    ("/b/c/g..", "/b/c/g.."),
    ("/b/c/..g", "/b/c/..g"),
    ("/b/c/./../g", "/b/g"),
    ("/b/c/./g/.", "/b/c/g/"),
    ("/b/c/g/./h", "/b/c/g/h"),
    ("/b/c/g/../h", "/b/c/h"),
    ("/b/c/g;x=1/./y", "/b/c/g;x=1/y"),
    ("/b/c/g;x=1/../y", "/b/c/y"),
    ("/a/b/c/./../../g", "/a/g"),  # section 5.2.4's own example
]
# The RFC clamps these at the root ("../../../g" -> "/g"); a proxy rejects them instead.
ABOVE_ROOT = ["/b/c/../../../g", "/b/c/../../../../g", "/../g", "/..", "/a/../.."]


@pytest.mark.parametrize(("merged", "expected"), RFC_5_4)
def test_remove_dot_segments_rfc3986_examples(merged, expected):
    assert remove_dot_segments(merged) == expected


@pytest.mark.parametrize("path", ABOVE_ROOT)
def test_above_the_root_is_rejected(path):
    with pytest.raises(BadTarget) as info:
        remove_dot_segments(path)
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/public/../private/x", "/private/x"),
        ("/public/%2e%2e/private/x", "/private/x"),
        ("/public/.%2E/private", "/private"),
        ("/public/%2E./private", "/private"),
        ("/public/./../private", "/private"),
        ("/public/./a/../b", "/public/b"),
        ("/%7euser/%41%62c%2D%5f%2e", "/~user/Abc-_."),  # unreserved escapes decoded
        ("/a%2fb/%3f%20%c3%a9", "/a/b/%3F%20%C3%A9"),  # %2F is a slash, others kept uppercased
        ("/a/../b?x=/../%2e&y=%2f", "/b?x=/../%2e&y=%2f"),  # the query is untouched
        ("/p?q=%2e%2e", "/p?q=%2e%2e"),
    ],
)
def test_normalize_target(target, expected):
    assert normalize_target(target, "GET") == expected
    assert normalize_target_bytes(target.encode(), b"GET") == expected.encode()


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/a%2fb/%3f%20%c3%a9", "/a%2Fb/%3F%20%C3%A9"),  # others kept, hex uppercased
        ("/a/..%2f..%2fb", "/a/..%2F..%2Fb"),  # an escaped slash is no separator (KEEP)
    ],
)
def test_keep_mode_leaves_escaped_slashes(target, expected):
    """Envoy's KEEP_UNCHANGED, the behaviour before issue 19 (now an unsafe option)."""
    assert normalize_target(target, "GET", slashes=KEEP) == expected
    assert normalize_target_bytes(target.encode(), b"GET", KEEP) == expected.encode()
    with pytest.raises(BadTarget):
        normalize_target(target, "GET", slashes=REJECT)


@pytest.mark.parametrize(
    "target", ["/public/index.html", "/a/.hidden", "/a/b?x=%41", "/", "/x?y=/../z", "/a;b=c"]
)
def test_already_normal_target_is_the_same_object(target):
    for mode in ESCAPED_SLASH_MODES:
        assert normalize_target(target, "GET", slashes=mode) is target
        raw = target.encode()
        assert normalize_target_bytes(raw, b"GET", mode) is raw
    kept = "/a%2Fb"
    assert normalize_target(kept, "GET", slashes=KEEP) is kept
    assert normalize_target(kept, "GET") == "/a/b"


# ---- the issue 19 table (tests/path_table.py, printed in docs/proxy-core.md) ----------------


def _outcome(target: str, mode: str, http2: bool):
    try:
        if http2:
            return normalize_target(target, "GET", absolute_form=False, slashes=mode)
        return normalize_target(target, "GET", slashes=mode)
    except BadTarget as exc:
        assert exc.status == 400
        return BAD


@pytest.mark.parametrize("mode", ESCAPED_SLASH_MODES)
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_table_row(row, mode):
    assert _outcome(row.target, mode, False) == row.expected(mode)
    assert _outcome(row.target, mode, True) == row.expected(mode, http2=True)
    raw = row.target.encode("latin-1")
    if not all(0x21 <= b <= 0x7E for b in raw):
        return  # llhttp refuses it first (the test below); the bytes variant never sees it
    try:
        got = normalize_target_bytes(raw, b"GET", mode).decode("latin-1")
    except BadTarget:
        got = BAD
    assert got == row.expected(mode)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_table_outcome_is_a_fixed_point(row):
    """What is forwarded needs nothing more: judged form == forwarded form == what a backend
    normalizing again would read."""
    for mode in ESCAPED_SLASH_MODES:
        out = row.expected(mode)
        if out != BAD:
            assert normalize_target(out, "GET", slashes=mode) == out


def test_default_is_unescape():
    assert normalize_target("/public/..%2Fadmin", "GET") == "/admin"
    assert normalize_target("/public/..%2Fadmin", "GET", slashes=UNESCAPE) == "/admin"


@pytest.mark.parametrize(
    "target",
    ["/%2e%2e/x", "/..", "/a/%2E%2E/..", "/a%zz", "/a%2", "/a%", "x/y", "", "*", "/a/..%2f..%2fb"],
)
def test_bad_targets(target):
    with pytest.raises(BadTarget):
        normalize_target(target, "GET")
    with pytest.raises(BadTarget):
        normalize_target_bytes(target.encode(), b"GET")


def test_asterisk_connect_and_absolute_form():
    assert normalize_target("*", "OPTIONS") == "*"
    assert normalize_target("example.com:443", "CONNECT") == "example.com:443"
    with pytest.raises(BadTarget):
        normalize_target("a/b", "CONNECT")
    # absolute-form becomes origin-form; its authority replaces Host
    assert normalize_target("http://h:8/public/../x?a", "GET") == "/x?a"
    assert normalize_target("HTTP://h", "GET") == "/"
    assert normalize_target("https://h?q", "GET") == "/?q"
    assert target_authority("http://h:8/public/../x?a") == "h:8"
    assert target_authority("/x") is None
    for bad in ("http:///x", "http://u@h/x", "ftp://h/x"):
        with pytest.raises(BadTarget):
            normalize_target(bad, "GET")
    with pytest.raises(BadTarget):  # HTTP/2's :path never carries absolute-form
        normalize_target("http://h/x", "GET", absolute_form=False)


# ---- the HTTP/1 session: the policy decides on, and the upstream gets, the normalized path ----


def test_session_forwards_the_normalized_head():
    play = Play()
    play.client_sends(b"GET /public/./a/%2e%2e/b HTTP/1.1\r\nHost: web\r\n\r\n")
    assert play.upstream_got() == b"GET /public/b HTTP/1.1\r\nHost: web\r\n\r\n"
    play.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert play.client_got().startswith(b"HTTP/1.1 200 OK")
    assert play.flows()[-1]["l7"]["http"]["url"] == "/public/b"


def test_session_denies_on_the_normalized_path():
    play = Play()
    play.client_sends(b"GET /public/%2e%2E/private/x HTTP/1.1\r\nHost: web\r\n\r\n")
    assert play.client_got().startswith(b"HTTP/1.1 403 Forbidden")
    assert play.upstream_got() == b""
    play.client_sends(b"GET /public/ok HTTP/1.1\r\nHost: web\r\n\r\n")  # still usable
    assert play.upstream_got() == b"GET /public/ok HTTP/1.1\r\nHost: web\r\n\r\n"


def test_session_answers_400_above_the_root_and_closes():
    play = Play()
    play.client_sends(b"GET /%2e%2e/x HTTP/1.1\r\nHost: web\r\n\r\n")
    assert play.client_got().startswith(b"HTTP/1.1 400 ")
    assert play.upstream_got() == b""
    assert play.client.closed


def test_session_absolute_form_becomes_origin_form_with_its_host():
    play = Play()
    play.client_sends(
        b"GET http://api:81/public/../public/x HTTP/1.1\r\nHost: web\r\nAccept: */*\r\n\r\n"
    )
    assert play.upstream_got() == (b"GET /public/x HTTP/1.1\r\nHost: api:81\r\nAccept: */*\r\n\r\n")


@pytest.mark.parametrize(
    "target", [b"/a b", b"/a\x01", b"/a\x7f", b"/caf\xc3\xa9", b"/a\tb", b"/public/x\x01"]
)
def test_the_http1_parser_refuses_what_the_bytes_hot_path_does_not_look_for(target):
    """normalize_target_bytes skips the character check (controls, space, non-ASCII): llhttp
    answers 400 for them before any verdict."""
    from parsers.http1 import ParseError, RequestParser

    events = RequestParser().receive_data(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert any(isinstance(e, ParseError) and e.status == 400 for e in events), events


def test_verdicts_judge_under_the_given_mode_and_cache_per_mode():
    from l7proxy.http1 import verdicts
    from parsers.http1 import RequestParser
    from tests.unit.http1.playbook import PathRules

    rules = PathRules()
    head = b"GET /public/..%2Fadmin HTTP/1.1\r\nHost: w\r\n\r\n"
    req = RequestParser().receive_data(head)[0]
    d = verdicts.decide(rules, req)
    assert not d.allowed and d.req.target == b"/admin" and not d.status
    kept = verdicts.decide(rules, req, KEEP)  # the mode flips: a fresh cache, judged again
    assert kept.allowed and kept.req is None  # already normal in that mode: forwarded as is
    assert verdicts.decide(rules, req, REJECT).status == 400
    assert not verdicts.decide(rules, req, UNESCAPE).allowed


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (UNESCAPE, b"HTTP/1.1 403 Forbidden"),
        (REJECT, b"HTTP/1.1 400 "),
        (KEEP, b"HTTP/1.1 200 OK"),
    ],
)
def test_session_judges_under_the_configured_mode(mode, expected):
    from l7proxy.config import ProxyConfig

    play = Play(config=ProxyConfig(path_escaped_slashes=mode))
    play.client_sends(b"GET /public/..%2Fadmin HTTP/1.1\r\nHost: web\r\n\r\n")
    if mode == KEEP:  # the unsafe mode forwards it as it came
        assert play.upstream_got() == b"GET /public/..%2Fadmin HTTP/1.1\r\nHost: web\r\n\r\n"
        play.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    else:
        assert play.upstream_got() == b""
    assert play.client_got().startswith(expected)
