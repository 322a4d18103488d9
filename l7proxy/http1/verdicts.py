"""HTTP/1 requests against the compiled L7 rule set: a memoised verdict and the header edits.

`HttpRuleSet.check(method, path, host, headers)` (policies, see docs/contracts.md) is pure, so
its answer for one rule-set object and one request shape never changes; a reload brings a new
rule-set object and so a fresh cache. The cache keys on the raw bytes the parser produced, which
saves decoding every header of every request on the hot path (wrk-style traffic repeats).
"""

from __future__ import annotations

from dataclasses import dataclass

from parsers.http1 import Request, build_head

MAX_CACHED = 4096
# Only small requests are memoised: 4,096 entries of at most 2 KiB of head bound a cache at
# ~8 MiB however large or varied the heads an attacker sends.
MAX_CACHED_HEAD = 2048


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    raw: bytes | None  # the head to forward when header actions changed it, else None
    logged: tuple[str, ...]  # LOG actions: header names only, never values (secrets)


ALLOW_ALL = Decision(True, None, ())

# One cache per rule-set object (several sources or ports may use different sets at once); the
# entry keeps its rule set alive, so an id is never reused while its cache exists.
MAX_RULE_SETS = 64
_caches: dict[int, tuple[object, dict]] = {}


def decide(rules, req: Request) -> Decision:
    """The verdict of `rules` (an L7 rule set, or None for "allow all") on `req`."""
    if rules is None:
        return ALLOW_ALL
    if req.head_len > MAX_CACHED_HEAD:
        return _evaluate(rules, req)
    entry = _caches.get(id(rules))
    if entry is None or entry[0] is not rules:
        if len(_caches) >= MAX_RULE_SETS:
            _caches.clear()  # old revisions go; the live sets refill at once
        entry = _caches[id(rules)] = (rules, {})
    cache = entry[1]
    key = (req.method, req.target, req.headers)
    hit = cache.get(key)
    if hit is not None:
        return hit
    decision = _evaluate(rules, req)
    if len(cache) >= MAX_CACHED:
        cache.clear()
    cache[key] = decision
    return decision


def _evaluate(rules, req: Request) -> Decision:
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
    for act in actions:
        kind, name, value = _action_parts(act)
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


def _action_parts(act) -> tuple[str, str, str | None]:
    """A header action from the policy engine: an object with action/name/value attributes
    (or a (action, name, value) tuple)."""
    if isinstance(act, tuple):
        kind, name, value = (tuple(act) + (None,))[:3]
    else:
        kind = getattr(act, "action", None) or getattr(act, "mismatch", None)
        name = act.name
        value = getattr(act, "value", None)
    kind = str(getattr(kind, "value", kind) or "").upper()
    return kind, str(name), None if value is None else str(value)
