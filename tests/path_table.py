"""The path-normalisation table (issue 19): what each request target becomes in each
`path_escaped_slashes` mode. One table for the unit tests (parsers/http_path.py), the end-to-end
tests (tests/e2e/test_path_normalization_table.py: a real gateway in front of nginx and Python's
http.server, HTTP/1 and HTTP/2) and docs/proxy-core.md, which prints the same rows.

An expectation is the target the proxy judges and forwards, or BAD (400, nothing forwarded).
With the policy `GET /public/.*` a forwarded target outside /public/ is then 403.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BAD = 400
POLICY_PATH = re.compile(r"/public/.*")  # what the e2e policy allows (anchored, as Cilium's)


@dataclass(frozen=True)
class Row:
    name: str
    target: str
    unescape: str | int  # the default mode
    reject: str | int
    keep: str | int  # Envoy's KEEP_UNCHANGED: unsafe, kept for backends that need %2F
    h2: bool = True  # False: HTTP/2 answers 400 whatever the mode (absolute-form in :path)

    def expected(self, mode: str, http2: bool = False) -> str | int:
        if http2 and not self.h2:
            return BAD
        return getattr(self, mode)


def same(name: str, target: str, result: str | int) -> Row:
    return Row(name, target, result, result, result)


ROWS = [
    same("dot-dot", "/public/../admin", "/admin"),
    Row("escaped-slash", "/public/..%2Fadmin", "/admin", BAD, "/public/..%2Fadmin"),
    Row("escaped-lowercase", "/public/%2e%2e%2fadmin", "/admin", BAD, "/public/..%2Fadmin"),
    Row("escaped-mixed-case", "/public/%2E%2e%2fadmin", "/admin", BAD, "/public/..%2Fadmin"),
    Row(
        "escaped-slash-chain",
        "/public/x/..%2F..%2Fadmin",
        "/admin",
        BAD,
        "/public/x/..%2F..%2Fadmin",
    ),  # fmt: skip
    Row("escaped-slash-plain", "/public/a%2Fb", "/public/a/b", BAD, "/public/a%2Fb"),
    Row("escaped-backslash", "/public/..%5Cadmin", "/admin", BAD, "/public/..%5Cadmin"),
    Row("backslash", "/public/..\\admin", "/admin", BAD, "/public/..\\admin"),
    same("escaped-dot-dot", "/public/%2e%2e/admin", "/admin"),
    same("half-escaped-dot-dot", "/public/.%2E/admin", "/admin"),
    same("escaped-dot", "/public/%2e/x", "/public/x"),
    same("unreserved-escapes", "/public/%7e%41", "/public/~A"),
    same("double-encoding", "/public/%252e%252e%252fadmin", BAD),
    same("double-encoding-split", "/public/%25%32%65%25%32%65/admin", BAD),
    same("dot-dot-parameter", "/public/..;/admin", BAD),
    same("dot-dot-escaped-semicolon", "/public/..%3b/admin", BAD),
    same("dot-parameter", "/public/.;x=1/x", BAD),
    same("path-parameter", "/public/x;v=1", "/public/x;v=1"),
    same("nul", "/public/x%00", BAD),
    same("escaped-crlf", "/public/x%0d%0aX-A:%20b", BAD),
    same("overlong-dot", "/public/%c0%ae%c0%ae/admin", BAD),
    same("overlong-slash", "/public/..%c0%afadmin", BAD),
    same("overlong-3-byte-dot", "/public/%e0%80%ae%e0%80%ae/admin", BAD),
    same("latin-1-byte", "/public/caf%e9", BAD),
    same("utf-8", "/public/caf%c3%a9", "/public/caf%C3%A9"),
    same("double-slash-dot-dot", "/public//../admin", "/admin"),
    same("leading-double-slash", "//admin", "/admin"),
    same("double-slash", "/public//x", "/public/x"),
    same("trailing-dot-dot", "/public/x/..", "/public/"),
    same("dot-dot-to-root", "/public/..", "/"),
    same("above-root", "/public/../../admin", BAD),
    same("escaped-above-root", "/%2e%2e/admin", BAD),
    same("bad-escape", "/public/%zz", BAD),
    same("iis-unicode-escape", "/public/%u002e%u002e/admin", BAD),
    same("fragment", "/public/..#", BAD),
    same("fragment-dot-dot", "/public/x#/../../admin", BAD),
    same(
        "query-untouched", "/public/x?p=/../../admin&q=%2e%2F", "/public/x?p=/../../admin&q=%2e%2F"
    ),  # fmt: skip
    same("space", "/public/x y", BAD),
    same("control-byte", "/public/x\x01", BAD),
    Row(
        "absolute-form",
        "http://web/public/..%2Fadmin",
        "/admin",
        BAD,
        "/public/..%2Fadmin",
        h2=False,
    ),  # fmt: skip
    Row(
        "absolute-form-allowed",
        "http://web/public/%2e/x",
        "/public/x",
        "/public/x",
        "/public/x",
        h2=False,
    ),  # fmt: skip
]


def verdict(expected: str | int) -> int:
    """What the client gets from the proxy: 400, 403, or 0 for "forwarded"."""
    if expected == BAD:
        return BAD
    return 0 if POLICY_PATH.fullmatch(expected) else 403
