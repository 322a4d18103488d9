"""The HTTP/2 relay's view of the L7 policy: one `HttpRuleSet.check` per distinct request.

Same rule semantics as HTTP/1 (docs/contracts.md): `:method`, `:path` with its query,
`:authority` (or Host) as the host, and the regular headers. The relay memoizes decisions per raw
header block for as long as `epoch()` returns the same rule-set object, so a policy reload applies
to the very next request.
"""

from __future__ import annotations

from parsers.http2 import Decision, H2Limits, Request

ALLOW = Decision(True)
DENY = Decision(False)


_LIMITS: dict[object, H2Limits] = {}


def limits_from_config(cfg) -> H2Limits:
    """The relay's limits from the proxy's one config object (`ProxyConfig`, settable by `-c`):
    parsers/ can't import l7proxy, so the mapping lives here, at the session boundary. Cached
    per config object (a worker has one), so a connection costs no rebuild."""
    hit = _LIMITS.get(cfg)
    if hit is None:
        hit = _LIMITS[cfg] = H2Limits(
            max_concurrent_streams=cfg.h2_max_concurrent_streams,
            max_frame_size=cfg.h2_max_frame_size,
            max_header_block=cfg.max_header_bytes,
            max_continuation_frames=cfg.h2_max_continuation_frames,
            max_header_list_size=cfg.max_header_bytes,
            hard_header_list_size=4 * cfg.max_header_bytes,
            max_header_count=max(cfg.max_header_count, 16),
            max_header_table_size=cfg.h2_max_header_table_size,
            response_header_table_size=cfg.h2_response_header_table_size,
            reset_burst=cfg.h2_reset_burst,
            reset_refill=cfg.h2_reset_refill,
            control_burst=cfg.h2_control_burst,
            control_refill=cfg.h2_control_refill,
            max_discarded_body=cfg.h2_max_discarded_body,
            max_held_bytes=cfg.h2_max_held_bytes,
            deny_body=cfg.deny_message.encode("utf-8"),
            path_escaped_slashes=cfg.path_escaped_slashes,
        )
        if len(_LIMITS) > 64:  # only tests make many configs
            _LIMITS.clear()
    return hit


class H2Policy:
    __slots__ = ("ctx",)

    def __init__(self, ctx) -> None:
        self.ctx = ctx

    def epoch(self) -> object:
        return self.ctx.rules()

    def decide(self, request: Request) -> Decision:
        rules = self.ctx.rules()
        if rules is None:
            return ALLOW
        regular = [(n, v) for n, v in request.headers if n[:1] != ":"]
        verdict = rules.check(request.method, request.path, request.authority, regular)
        if not verdict.allowed:
            return DENY
        actions = tuple(getattr(verdict, "header_actions", ()) or ())
        if not actions:
            return ALLOW
        edited, logged = apply_header_actions(request.headers, actions)
        return Decision(True, edited, logged)


def apply_header_actions(headers, actions) -> tuple[tuple[tuple[str, str], ...] | None, tuple]:
    """Cilium headerMatches mismatch actions on an HTTP/2 header list (names are lowercase in
    HTTP/2). Returns (the edited list or None when unchanged, the LOGged header names)."""
    edited = list(headers)
    logged: list[str] = []
    changed = False
    for kind, name, value in actions:  # policies: (ADD|DELETE|REPLACE|LOG, name, value)
        lname = name.lower()
        if kind == "LOG":
            logged.append(name)
            continue
        if kind in ("DELETE", "REPLACE"):
            kept = [(n, v) for n, v in edited if n != lname]
            changed |= len(kept) != len(edited)
            edited = kept
        if kind in ("ADD", "REPLACE"):
            if kind == "ADD" and any(n == lname for n, _ in edited):
                continue
            edited.append((lname, value or ""))
            changed = True
    return (tuple(edited) if changed else None), tuple(logged)
