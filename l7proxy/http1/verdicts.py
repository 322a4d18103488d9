"""HTTP/1 requests against the compiled L7 rule set: a memoised verdict and the header edits.

`HttpRuleSet.check(method, path, host, headers)` (policies, see docs/contracts.md) is pure, so
its answer for one rule-set object and one request shape never changes; a reload brings a new
rule-set object and so a fresh cache. The cache keys on the raw bytes the parser produced, which
saves decoding every header of every request on the hot path (wrk-style traffic repeats). The
same cache also remembers whole request heads (`remember`/`recall`), so a read byte-identical
to one already parsed skips the parser as well.

The path is normalized here too (RFC 3986, parsers/http_path.py; Envoy's `normalize_path`), at a
cache miss only: the policy decides on the normalized request, and when normalization changed the
target the decision carries that request and its rebuilt head, which is what goes upstream. So
`/public/../private/x` is judged, and forwarded, as `/private/x`.
"""

from __future__ import annotations

from dataclasses import dataclass

from parsers.http1 import Request, build_head, head_bytes
from parsers.http_path import UNESCAPE, BadTarget, normalize_target_bytes, target_authority

MAX_CACHED = 4096
# Only small requests are memoised: 4,096 entries of at most 2 KiB of head bound a cache at
# ~8 MiB however large or varied the heads an attacker sends.
MAX_CACHED_HEAD = 2048


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    raw: bytes | None  # the head to forward when header actions or normalization changed it
    logged: tuple[str, ...]  # LOG actions: header names only, never values (secrets)
    # The request with its normalized target when normalization changed it (else None): the
    # session uses it from then on (flows, h2c). With `status` 400 the target can't be
    # normalized (above the root, not origin-form...): answered without asking the policy.
    req: Request | None = None
    status: int = 0


ALLOW_ALL = Decision(True, None, ())

# One cache per rule-set object (several sources or ports may use different sets at once); the
# entry keeps its rule set alive, so an id is never reused while its cache exists.
MAX_RULE_SETS = 64
_caches: dict[int, tuple[object, dict]] = {}


def with_target(req: Request, target: bytes) -> Request:
    """`req` with its normalized target (parsers/http_path.py): the policy decides on it and the
    head is rebuilt with it. An absolute-form target's authority replaces Host (RFC 9112
    section 3.2.2), so the policy's host and the forwarded Host agree too."""
    authority = target_authority(req.target.decode("latin-1"))
    if authority is None:
        req = req._replace(target=target)
    else:
        host = authority.encode("latin-1")
        headers = [(n, v) for n, v in req.headers if n.lower() != b"host"]
        headers.insert(0, (b"Host", host))
        req = req._replace(target=target, host=host, headers=tuple(headers))
    return req._replace(head_len=len(head_bytes(req)))


def _cache_of(rules, slashes: str | None = None) -> dict:
    """The cache of `rules`; with `slashes` (the path mode, ProxyConfig.path_escaped_slashes)
    one filled under that mode. A process has one config, so the mode never flips in use; a
    test running several configs gets a fresh cache when it does."""
    entry = _caches.get(id(rules))
    if entry is None or entry[0] is not rules or (slashes is not None and entry[2] != slashes):
        if len(_caches) >= MAX_RULE_SETS:
            _caches.clear()  # old revisions go; the live sets refill at once
        entry = _caches[id(rules)] = (rules, {}, slashes or UNESCAPE)
    return entry[1]


def recall(rules, head: bytes):
    """`(request, decision)` for a read that is byte for byte a request head `remember`ed
    under `rules`, else None. Parsing is a pure function of the bytes when the parser is at rest
    between messages, so an identical read parses to the identical request: the session skips
    the parser and the policy for it (wrk-style and browser traffic repeats heads exactly)."""
    if len(head) > MAX_CACHED_HEAD:
        # Never remembered; and hashing it would cost a pass over the read (the first read of
        # a 1 MiB upload, up to 256 KiB of it: 14 % of the gateway's samples under py-spy).
        return None
    entry = _caches.get(id(rules))
    if entry is None or entry[0] is not rules:
        return None
    return entry[1].get(head)


def remember(rules, head: bytes, req: Request, decision: Decision) -> None:
    """Record what the strict parser and the policy made of `head`, a read that was exactly one
    complete keep-alive request without a body (the caller checks). Bounded like `decide`."""
    if len(head) > MAX_CACHED_HEAD:
        return
    cache = _cache_of(rules)
    if len(cache) >= MAX_CACHED:
        cache.clear()
    cache[head] = (req, decision)


def decide(rules, req: Request, slashes: str = UNESCAPE) -> Decision:
    """The verdict of `rules` (an L7 rule set, or None for "allow all") on `req`, its path
    normalized under `slashes` (parsers/http_path.py)."""
    if rules is None:
        return ALLOW_ALL
    if req.head_len > MAX_CACHED_HEAD:
        return _evaluate(rules, req, slashes)
    cache = _cache_of(rules, slashes)
    key = (req.method, req.target, req.headers)
    hit = cache.get(key)
    if hit is not None:
        return hit
    decision = _evaluate(rules, req, slashes)
    if len(cache) >= MAX_CACHED:
        cache.clear()
    cache[key] = decision
    return decision


def _evaluate(rules, req: Request, slashes: str) -> Decision:
    decision = _evaluate_target(rules, req, slashes)
    if decision.allowed and _offers_h2(req):
        raw = head_without_h2c(decision.req or req, decision.raw)
        decision = Decision(True, raw, decision.logged, decision.req, decision.status)
    return decision


def _evaluate_target(rules, req: Request, slashes: str) -> Decision:
    target = req.target
    try:
        normalized = normalize_target_bytes(target, req.method, slashes)
    except BadTarget as exc:
        return Decision(False, None, (), req, exc.status)
    if normalized is target:
        return _judge(rules, req)
    req = with_target(req, normalized)
    decision = _judge(rules, req)
    raw = decision.raw or head_bytes(req) if decision.allowed else None
    return Decision(decision.allowed, raw, decision.logged, req)


def _offers_h2(req: Request) -> bool:
    return any(n.lower() == b"upgrade" and b"h2" in v.lower() for n, v in req.headers)


def head_without_h2c(req: Request, head: bytes | None) -> bytes | None:
    """The head to forward for an allowed request that offers HTTP/2 in Upgrade, with the
    offer removed: `h2c`-like tokens (anything starting with `h2`) from Upgrade, HTTP2-Settings,
    and their Connection tokens. None when there is no such offer (forward `head` as it is).

    Forwarded as it came, an upstream that speaks h2c (Go's x/net/http2/h2c) answers 101 and the
    connection becomes a raw tunnel: every later HTTP/2 request on it would reach the upstream
    without being judged. That happened for an h2c Upgrade the session does not take over
    itself (pipelined, with a body, unusable HTTP2-Settings) and for `Upgrade: h2c` with
    `Connection: HTTP2-Settings` but no `upgrade` token, which Go upgrades and the parser does
    not take for an upgrade. Envoy strips the offer the same way. The session's own h2c
    takeover reads the request's headers, not this head. `head` is the canonical head built by
    `build_head` (header actions or normalization changed it), else None."""
    if not _offers_h2(req):
        return None
    line, *fields = (head or head_bytes(req)).split(b"\r\n")
    headers = [f.split(b": ", 1) for f in fields if f]
    out = []
    upgrade_left = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"http2-settings":
            continue
        if lname == b"upgrade":
            tokens = [t.strip() for t in value.split(b",")]
            value = b", ".join(t for t in tokens if t and not t.lower().startswith(b"h2"))
            if not value:
                continue
            upgrade_left = True
        out.append([name, value])
    for pair in out:
        if pair[0].lower() == b"connection":
            drop = (b"http2-settings",) if upgrade_left else (b"http2-settings", b"upgrade")
            tokens = [t.strip() for t in pair[1].split(b",")]
            pair[1] = b", ".join(t for t in tokens if t and t.lower() not in drop)
    parts = [line, b"\r\n"]
    for name, value in out:
        if value or name.lower() != b"connection":
            parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def _judge(rules, req: Request) -> Decision:
    headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.headers]
    verdict = rules.check(
        req.method.decode("latin-1"),
        req.target.decode("latin-1"),
        req.host.decode("latin-1"),
        headers,
    )
    if not verdict.allowed:
        return Decision(False, None, ())
    actions = tuple(getattr(verdict, "header_actions", ()) or ())
    if not actions:
        return ALLOW_ALL
    edited = list(req.headers)
    logged: list[str] = []
    changed = False
    for kind, name, value in actions:  # policies: (ADD|DELETE|REPLACE|LOG, name, value)
        lname = name.lower().encode("latin-1")
        if kind == "LOG":
            logged.append(name)
            continue
        if kind in ("DELETE", "REPLACE"):
            kept = [(n, v) for n, v in edited if n.lower() != lname]
            changed |= len(kept) != len(edited)
            edited = kept
        if kind in ("ADD", "REPLACE"):
            if kind == "ADD" and any(n.lower() == lname for n, _ in edited):
                continue  # Cilium's ADD only adds a missing header
            edited.append((name.encode("latin-1"), (value or "").encode("latin-1")))
            changed = True
    raw = build_head(req.method, req.target, req.version, edited) if changed else None
    return Decision(True, raw, tuple(logged))
