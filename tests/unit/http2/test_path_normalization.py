"""The HTTP/2 relay normalizes :path (parsers/http_path.py) before the policy sees it, and the
server gets the normalized one: `/public/../private/x` is judged, and forwarded, as /private/x,
and so is `/public/..%2Fprivate/x` (issue 19: the default `unescape` mode)."""

from __future__ import annotations

import h2.events

from parsers.http2 import RequestRejected
from tests.unit.http2.harness import Triangle, deny_path


def server_paths(t: Triangle) -> list[str]:
    return [
        dict(e.headers)[":path"]
        for e in t.server_events
        if isinstance(e, h2.events.RequestReceived)
    ]


def test_dot_segments_are_removed_before_the_policy_and_upstream():
    t = Triangle(deny_path("/private"))
    bypass = t.request("/public/../private/x")
    escaped = t.request("/public/%2e%2E/private")
    ok = t.request("/public/./a/../b?q=/../%2e")
    t.pump()
    got = t.responses()
    assert got[bypass]["status"] == "403" and got[escaped]["status"] == "403"
    assert got[ok]["status"] == "200"
    assert got[ok]["body"] == b"hello /public/b?q=/../%2e"  # the query is untouched
    assert server_paths(t) == ["/public/b?q=/../%2e"]


def test_above_the_root_and_absolute_form_get_400_and_other_streams_carry_on():
    t = Triangle()
    above = t.request("/%2e%2e/x")
    absolute = t.request("http://h/x")
    ok = t.request("/public/y")
    t.pump()
    got = t.responses()
    assert got[above]["status"] == "400" and got[absolute]["status"] == "400"
    assert got[ok]["status"] == "200"
    assert server_paths(t) == ["/public/y"]
    rejected = [e for e in t.relay_events if isinstance(e, RequestRejected)]
    assert sorted(e.stream_id for e in rejected) == [above, absolute]
    assert all(e.status == 400 for e in rejected)


def test_an_already_normal_path_is_forwarded_as_is():
    t = Triangle()
    sid = t.request("/a/.hidden/%3B?x=%41")
    t.pump()
    assert t.responses()[sid]["status"] == "200"
    assert server_paths(t) == ["/a/.hidden/%3B?x=%41"]


def test_escaped_slashes_are_slashes_by_default():
    """Issue 19: nginx decodes %2F and resolves the dot segment, so the relay does the same
    before judging, and forwards that form."""
    t = Triangle(deny_path("/private"))
    bypass = t.request("/public/..%2Fprivate/x")
    lower = t.request("/public/%2e%2e%2fprivate")
    back = t.request("/public/..%5Cprivate")
    ok = t.request("/public/a%2Fb")
    bad = [t.request(p) for p in ("/public/..;/private", "/public/%252e%252e/x", "/p/%c0%ae")]
    t.pump()
    got = t.responses()
    assert [got[s]["status"] for s in (bypass, lower, back)] == ["403"] * 3
    assert got[ok]["status"] == "200"
    assert [got[s]["status"] for s in bad] == ["400"] * 3
    assert server_paths(t) == ["/public/a/b"]


def test_the_mode_comes_from_the_limits():
    """ProxyConfig.path_escaped_slashes reaches the relay as H2Limits.path_escaped_slashes."""
    from l7proxy.config import ProxyConfig
    from l7proxy.http2.policy import limits_from_config

    keep = limits_from_config(ProxyConfig(path_escaped_slashes="keep"))
    assert keep.path_escaped_slashes == "keep"
    assert limits_from_config(ProxyConfig()).path_escaped_slashes == "unescape"
    t = Triangle(deny_path("/private"), limits=keep)
    kept = t.request("/public/..%2Fprivate")  # KEEP: not a separator, so /public/...: allowed
    t.pump()
    assert t.responses()[kept]["status"] == "200"
    assert server_paths(t) == ["/public/..%2Fprivate"]
    reject = limits_from_config(ProxyConfig(path_escaped_slashes="reject"))
    t = Triangle(deny_path("/private"), limits=reject)
    rejected = t.request("/public/a%2Fb")
    t.pump()
    assert t.responses()[rejected]["status"] == "400" and server_paths(t) == []
