"""parsers/http_path.py: RFC 3986 path normalization of request targets (the dot-segment bypass)."""

from __future__ import annotations

import pytest

from parsers.http_path import (
    BadTarget,
    normalize_target,
    normalize_target_bytes,
    remove_dot_segments,
    target_authority,
)
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
        ("/a%2fb/%3f%20%c3%a9", "/a%2Fb/%3F%20%C3%A9"),  # others kept, hex uppercased
        ("/a/..%2f..%2fb", "/a/..%2F..%2Fb"),  # an escaped slash is no separator (KEEP)
        ("/a/../b?x=/../%2e&y=%2f", "/b?x=/../%2e&y=%2f"),  # the query is untouched
        ("/p?q=%2e%2e", "/p?q=%2e%2e"),
    ],
)
def test_normalize_target(target, expected):
    assert normalize_target(target, "GET") == expected
    assert normalize_target_bytes(target.encode(), b"GET") == expected.encode()


@pytest.mark.parametrize(
    "target", ["/public/index.html", "/a/.hidden", "/a/b?x=%41", "/", "/a%2Fb", "/x?y=/../z"]
)
def test_already_normal_target_is_the_same_object(target):
    assert normalize_target(target, "GET") is target
    raw = target.encode()
    assert normalize_target_bytes(raw, b"GET") is raw


@pytest.mark.parametrize(
    "target", ["/%2e%2e/x", "/..", "/a/%2E%2E/..", "/a%zz", "/a%2", "/a%", "x/y", "", "*"]
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
