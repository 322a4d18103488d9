"""Request-target normalization, so the policy and the backend see the same path.

Without it a rule allowing `GET /public/.*` lets `GET /public/../private/x` through, and a backend
that resolves dot segments (nginx, Python's http.server) serves /private/x. As Envoy's
HttpConnectionManager `normalize_path: true` does, the proxy normalizes the path (RFC 3986 section
6.2.2) and both decides on and forwards the normalized form:

- %XX of an unreserved character (ALPHA DIGIT - . _ ~) is decoded, so `%2e%2E` is `..`;
  every other escape keeps its meaning and has its hex uppercased (`%2f` -> `%2F`: an escaped
  slash stays escaped, Envoy's default KEEP_UNCHANGED);
- dot segments are removed (RFC 3986 section 5.2.4), but a path that climbs above the root
  (`/..`, `/a/../..`) is rejected instead of being clamped at `/`: it is an attack, not a typo;
- the query string is kept byte for byte (the policy still matches it, as in Cilium).

Targets that are not origin-form: `*` (OPTIONS) and the authority-form of CONNECT pass as they
are; an absolute-form target (`http://host/path`, HTTP/1.1 only) is turned into its normalized
origin-form path, and `target_authority` gives the host that replaces Host (RFC 9112 section
3.2.2, as HTTP/1.1 proxies do). Anything else is a 400.

A target that needs nothing (starts with '/', no '%' and no '/.') is returned as the very same
object, with no allocation: that is every request on the hot path.
"""

from __future__ import annotations

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_SCHEMES = ("http://", "https://")


class BadTarget(ValueError):
    """The request target can't be normalized: answer 400 and forward nothing."""

    status = 400


def remove_dot_segments(path: str) -> str:
    """RFC 3986 section 5.2.4 on an absolute path, except that climbing above the root raises
    BadTarget (the RFC would clamp it)."""
    segments = path[1:].split("/")
    last = len(segments) - 1
    out: list[str] = []
    for i, seg in enumerate(segments):
        if seg == ".":
            if i == last:
                out.append("")  # "/a/." is "/a/": the directory itself
        elif seg == "..":
            if not out:
                raise BadTarget("path goes above the root")
            out.pop()
            if i == last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)


def _normalize_escapes(path: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    for part in parts[1:]:
        hx = part[:2]
        if len(hx) != 2 or hx[0] not in _HEX or hx[1] not in _HEX:
            raise BadTarget("bad percent-encoding in path")
        ch = chr(int(hx, 16))
        out.append(ch if ch in _UNRESERVED else "%" + hx.upper())
        out.append(part[2:])
    return "".join(out)


def normalize_path(path: str) -> str:
    """The normalized form of an origin-form path without its query (starts with '/')."""
    if "%" in path:
        path = _normalize_escapes(path)
    if "/." in path:
        path = remove_dot_segments(path)
    return path


def _split_absolute(target: str) -> tuple[str, str] | None:
    """(authority, origin-form rest) of an http(s) absolute-form target, else None."""
    lower = target[:8].lower()
    for scheme in _SCHEMES:
        if lower.startswith(scheme):
            rest = target[len(scheme) :]
            cut = len(rest)
            for sep in "/?":
                pos = rest.find(sep)
                if pos != -1 and pos < cut:
                    cut = pos
            authority, origin = rest[:cut], rest[cut:]
            if not authority or "@" in authority:
                return None  # no host, or userinfo (RFC 9110 section 4.2.4 forbids it)
            if not origin.startswith("/"):
                origin = "/" + origin
            return authority, origin
    return None


def normalize_target(target: str, method: str, absolute_form: bool = True) -> str:
    """The normalized origin-form target (query unchanged), or `target` itself when it needs
    nothing. `absolute_form=False` rejects http://host/... (HTTP/2's :path never carries it)."""
    if target[:1] == "/":
        if "%" not in target and "/." not in target:
            return target  # the hot path
        path, mark, query = target.partition("?")
    elif target == "*" and method == "OPTIONS":
        return target
    elif method == "CONNECT":
        if not target or "/" in target:
            raise BadTarget("CONNECT needs an authority-form target")
        return target
    else:
        split = _split_absolute(target) if absolute_form else None
        if split is None:
            raise BadTarget("request target is not origin-form")
        path, mark, query = split[1].partition("?")
    normalized = normalize_path(path)
    if mark:
        normalized = normalized + mark + query
    return target if normalized == target else normalized


def target_authority(target: str) -> str | None:
    """The authority of an absolute-form target (which replaces Host), else None."""
    if target[:1] == "/":
        return None
    split = _split_absolute(target)
    return None if split is None else split[0]


def normalize_target_bytes(target: bytes, method: bytes) -> bytes:
    """`normalize_target` for an HTTP/1 request line's bytes (latin-1, as the parser gives)."""
    # (bytes.find, not `in`: `b"%" in target` first tries the operand as an int, ~3x slower)
    if target[:1] == b"/" and target.find(b"%") < 0 and target.find(b"/.") < 0:
        return target  # the hot path: no decode, no allocation
    text = target.decode("latin-1")
    normalized = normalize_target(text, method.decode("latin-1"))
    return target if normalized is text else normalized.encode("latin-1")
