"""Request-target normalization, so the policy and the backend see the same path.

A rule allowing `GET /public/.*` must not let through a target that the backend reads as a path
the rule would deny. Backends decode and resolve paths themselves: nginx and Python's
http.server decode every escape (`%2F` included), merge `//` and remove dot segments, so
`/public/..%2Fadmin` is /admin to them. The proxy therefore judges the path in the form such a
backend reads it, and forwards exactly that form (so whatever the backend does to it is a no-op),
or answers 400 when no single reading is safe. The steps, in order:

1. The target must be printable ASCII without `#` (RFC 9112 request-target; HTTP/1's parser
   already enforces the first part, HTTP/2's `:path` does not). A fragment is never sent by a
   client, and nginx and http.server drop everything after `#`: `/public/..#` would be /.
2. Escapes (`%XX`, either case): an unreserved character (ALPHA DIGIT `-._~`) is decoded, so
   `%2e%2E` is `..`; `%2F` and `%5C` follow the `slashes` mode below; other escapes keep their
   meaning with uppercased hex. Rejected (400): `%` without two hex digits, an escaped control
   byte (`%00`-`%1F`, `%7F`), `%25` followed by two hex digits (double encoding: a backend that
   decodes twice would see `%252e%252e` as `..`), and escaped bytes that are not valid UTF-8
   (overlong forms such as `%c0%ae`, which lenient decoders read as `.`).
3. `\\` (raw, or from `%5C`) is a separator to Windows-style and some Java backends: the
   `slashes` mode decides, as for `%2F`.
4. Runs of `/` are merged (nginx `merge_slashes`, http.server's normpath; Envoy `merge_slashes`),
   before dot segments are removed: nginx reads `/public//../admin` as /admin, not /public/admin.
5. A segment that is a dot segment with path parameters (`..;x`, `.;`, also `..%3B`) is 400:
   Tomcat and Spring strip the parameters and resolve it, nginx does not.
6. Dot segments are removed (RFC 3986 section 5.2.4), but a path that climbs above the root
   (`/..`, `/a/../..`) is 400 instead of being clamped at `/`: it is an attack, not a typo.
7. The query string is kept byte for byte (the policy still matches it, as in Cilium).

`slashes` (ProxyConfig.path_escaped_slashes; Envoy's `path_with_escaped_slashes_action`):
  - UNESCAPE (default, Envoy UNESCAPE_AND_FORWARD with merge_slashes; Istio
    DECODE_AND_MERGE_SLASHES): `%2F`, `%5C` and `\\` become `/`, judged and forwarded so;
  - REJECT (Envoy REJECT_REQUEST): a path with any of them is 400;
  - KEEP (Envoy's default KEEP_UNCHANGED): `%2F`/`%5C` stay escaped and `\\` stays, none is a
    separator here. UNSAFE in front of a backend that decodes them (nginx does): the issue 19
    bypass, `/public/..%2Fadmin`, is then allowed and nginx serves /admin.

Targets that are not origin-form: `*` (OPTIONS) and the authority-form of CONNECT pass as they
are; an absolute-form target (`http://host/path`, HTTP/1.1 only) is turned into its normalized
origin-form path, and `target_authority` gives the host that replaces Host (RFC 9112 section
3.2.2, as HTTP/1.1 proxies do). Anything else is a 400.

A target that needs nothing (starts with '/', printable ASCII, no `%`, `\\`, `#`, `//` or `/.`)
is returned as the very same object, with no allocation: that is every request on the hot path.
"""

from __future__ import annotations

import re

UNESCAPE = "unescape"
REJECT = "reject"
KEEP = "keep"
ESCAPED_SLASH_MODES = (UNESCAPE, REJECT, KEEP)
# What the gateway and the agent log at start when the config picks KEEP.
KEEP_WARNING = (
    "warning: path_escaped_slashes=keep: %2F and %5C in request paths are not separators for "
    "the policy, but a backend that decodes them (nginx does) resolves `/public/..%2Fadmin` to "
    "/admin, a path the policy never judged; use unescape (default) or reject unless the "
    "backend treats %2F as data"
)

_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
_SCHEMES = ("http://", "https://")
# Anything that may need work: one scan decides the hot path.
_SUSPECT = re.compile(r"[%\\#]|/[./]|[^!-~]")
_BAD_CHAR = re.compile(r"[^!-~]|#")
_SLASHES = re.compile(r"//+")
_PARAMS = re.compile(r";|%3B")
_DOUBLE = re.compile(r"%25[0-9A-Fa-f]{2}")


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


def _escaped_slash(escape: str, slashes: str) -> str:
    if slashes == UNESCAPE:
        return "/"
    if slashes == KEEP:
        return escape
    raise BadTarget("escaped slash or backslash in path")


def _normalize_escapes(path: str, slashes: str) -> str:
    parts = path.split("%")
    out = [parts[0]]
    high = False  # an escaped byte >= 0x80: the decoded path must be UTF-8
    for part in parts[1:]:
        hx = part[:2]
        if len(hx) != 2 or hx[0] not in _HEX or hx[1] not in _HEX:
            raise BadTarget("bad percent-encoding in path")
        byte = int(hx, 16)
        ch = chr(byte)
        if ch in _UNRESERVED:
            out.append(ch)
        elif byte < 0x20 or byte == 0x7F:
            raise BadTarget("escaped control character in path")
        elif byte == 0x2F or byte == 0x5C:
            out.append(_escaped_slash("%" + hx.upper(), slashes))
        else:
            high |= byte >= 0x80
            out.append("%" + hx.upper())
        out.append(part[2:])
    if high:
        _check_utf8(path)
    decoded = "".join(out)
    # Checked on the result, so `%25%32%65` (which becomes `%252e`) is caught too.
    if "%25" in decoded and _DOUBLE.search(decoded) is not None:
        raise BadTarget("double percent-encoding in path")
    return decoded


def _check_utf8(path: str) -> None:
    """The bytes the escapes of `path` stand for must be UTF-8, without overlong forms
    (`%c0%ae` is `.` to a lenient decoder) or surrogates: Python's strict codec checks both."""
    raw = bytearray()
    parts = path.split("%")
    raw += parts[0].encode("ascii")
    for part in parts[1:]:
        raw.append(int(part[:2], 16))
        raw += part[2:].encode("ascii")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadTarget("escaped bytes in path are not UTF-8") from None


def _check_dot_parameters(path: str) -> None:
    for seg in path.split("/"):
        if seg[:1] == "." and seg not in (".", "..") and _PARAMS.split(seg, 1)[0] in (".", ".."):
            raise BadTarget("dot segment with path parameters")


def normalize_path(path: str, slashes: str = UNESCAPE) -> str:
    """The normalized form of an origin-form path without its query (starts with '/', printable
    ASCII, no '#': the caller checked)."""
    if "%" in path:
        path = _normalize_escapes(path, slashes)
    if "\\" in path and slashes != KEEP:
        if slashes == REJECT:
            raise BadTarget("backslash in path")
        path = path.replace("\\", "/")
    if "//" in path:
        path = _SLASHES.sub("/", path)
    if "/." in path:
        if ";" in path or "%3B" in path:
            _check_dot_parameters(path)
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


def normalize_target(
    target: str, method: str, absolute_form: bool = True, slashes: str = UNESCAPE
) -> str:
    """The normalized origin-form target (query unchanged), or `target` itself when it needs
    nothing. `absolute_form=False` rejects http://host/... (HTTP/2's :path never carries it).
    `slashes` is one of ESCAPED_SLASH_MODES."""
    if target[:1] == "/" and _SUSPECT.search(target) is None:
        return target  # the hot path
    if _BAD_CHAR.search(target) is not None:
        raise BadTarget("control, space, non-ASCII or '#' in the request target")
    if target[:1] == "/":
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
    normalized = normalize_path(path, slashes)
    if mark:
        normalized = normalized + mark + query
    return target if normalized == target else normalized


def target_authority(target: str) -> str | None:
    """The authority of an absolute-form target (which replaces Host), else None."""
    if target[:1] == "/":
        return None
    split = _split_absolute(target)
    return None if split is None else split[0]


def normalize_target_bytes(target: bytes, method: bytes, slashes: str = UNESCAPE) -> bytes:
    """`normalize_target` for an HTTP/1 request line's bytes (latin-1, as the parser gives)."""
    # The HTTP/1 parser (llhttp) already refused controls, spaces and non-ASCII bytes, so the
    # hot path only looks for the rest; five `find`s beat one regex here (bytes.find, not `in`:
    # `b"%" in target` first tries the operand as an int, ~3x slower).
    if (
        target[:1] == b"/"
        and target.find(b"%") < 0
        and target.find(b"/.") < 0
        and target.find(b"//") < 0
        and target.find(b"\\") < 0
        and target.find(b"#") < 0
    ):
        return target  # the hot path: no decode, no allocation
    text = target.decode("latin-1")
    normalized = normalize_target(text, method.decode("latin-1"), True, slashes)
    return target if normalized is text else normalized.encode("latin-1")
