"""One ingress/egress rule (`PeerRule`): its peers (endpoints, CIDRs, entities, nodes, requires),
toFQDNs (the IPs DNS answers gave for the names), the peers that are named but not enforced
(toServices, groups), and its ports."""

from __future__ import annotations

from policies.fqdn import FQDNSelector
from policies.model import ENTITIES, PeerRule, Peers
from policies.parse_common import (
    _as_dict,
    _Ctx,
    _fqdn_selectors,
    _items,
    _key_error,
    _ln,
    _scope_peer,
    _selectors,
    _unenforced,
)
from policies.parse_l4 import _parse_cidrs, _parse_icmps, _parse_to_ports

# The L3 peer kinds of one rule, in Cilium's sanitizer order: a rule names at most one of them.
PEER_KINDS = {
    "in": ("fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "fromNodes", "fromGroups"),
    "out": (
        "toEndpoints",
        "toCIDR",
        "toCIDRSet",
        "toEntities",
        "toNodes",
        "toServices",
        "toFQDNs",
        "toGroups",
    ),
}
NOT_ENFORCED = {
    "toServices": "toServices is not enforced: traffic to these services is not allowed by this "
    "rule",
    "toGroups": "toGroups is not enforced: traffic to these groups is not allowed by this rule",
    "fromGroups": "fromGroups is not enforced: traffic from these groups is not allowed by this "
    "rule",
}


def _parse_peer_rule(item, field, line, direction, deny, ctx: _Ctx) -> PeerRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    prefix = "from" if direction == "in" else "to"
    _check_peer_keys(item, field, line, direction, ctx)
    _check_one_peer_kind(item, field, line, direction, ctx)
    endpoints = [
        _scope_peer(sel, ctx) for sel in _selectors(ctx, item, f"{prefix}Endpoints", field, line)
    ]
    nodes = _selectors(ctx, item, f"{prefix}Nodes", field, line)
    cidrs = _parse_cidrs(item, prefix, field, line, ctx)
    entities = _entities(item, f"{prefix}Entities", field, line, ctx)
    requires = _requires(item, prefix, field, line, ctx)
    unresolved = _not_enforced(item, field, line, deny, ctx)
    fqdns = _fqdns(item, field, line, deny, ctx)
    found = bool(endpoints or cidrs or entities or nodes or fqdns)
    has_l3 = found or unresolved or _names_no_peer(item, direction)
    if not has_l3 and not requires and "toPorts" not in item and "icmps" not in item:
        # `- {}`: no L3 and no L4 selects nobody; it only turns on default deny (Cilium).
        has_l3 = True
    peers = Peers(
        endpoints=tuple(endpoints),
        cidrs=tuple(cidrs),
        entities=tuple(entities),
        nodes=tuple(nodes),
        fqdns=tuple(fqdns),
        wildcard=not has_l3 and not requires,
        unresolved=unresolved and not found,
    )
    if requires and not has_l3:
        # A rule with only fromRequires allows nothing by itself (it only constrains others).
        peers = Peers(unresolved=True)
    if _authentication_drops(item, field, line, deny, ctx):
        peers = Peers(unresolved=True)
    ports = _parse_to_ports(item, field, line, deny, direction, ctx)
    icmps = _parse_icmps(item, field, line, ctx)
    if icmps and "toPorts" in item:
        _key_error(
            ctx, item, "icmps", field, line, "icmps and toPorts cannot be combined in one rule"
        )
    if ports is None:  # every port rule was dropped fail-closed
        peers = Peers(unresolved=True)
        ports = ()
    return PeerRule(
        peers=peers,
        ports=ports,
        icmps=tuple(icmps),
        requires=tuple(requires),
        line=line,
        path=field,
    )


def _check_peer_keys(item, field, line, direction, ctx: _Ctx) -> None:
    prefix, other = ("from", "egress") if direction == "in" else ("to", "ingress")
    known = {*PEER_KINDS[direction], f"{prefix}Requires", "toPorts", "icmps", "authentication"}
    for key in item:
        if key not in known:
            opposite = key.startswith("to" if direction == "in" else "from")
            hint = f" (an {other} field)" if opposite else ""
            ctx.error(_ln(item, key, line), f"{field}.{key}", f"unknown field{hint}")


def _check_one_peer_kind(item, field, line, direction, ctx: _Ctx) -> None:
    """Cilium's sanitizer refuses a rule that names two kinds of L3 peer ("Combining toCIDR and
    toEndpoints is not supported yet"): which of them would a port apply to?"""
    named = [k for k in PEER_KINDS[direction] if isinstance(item.get(k), list) and item[k]]
    if len(named) > 1:
        ctx.error(
            _ln(item, named[1], line),
            f"{field}.{named[1]}",
            f"{named[0]} and {named[1]} cannot be combined in one rule (Cilium refuses it too); "
            "write one rule for each",
        )
    if direction == "out" and named[:1] == ["toServices"] and item.get("toPorts"):
        _key_error(
            ctx,
            item,
            "toPorts",
            field,
            line,
            "toServices and toPorts cannot be combined in one rule (Cilium refuses it too)",
        )


def _fqdns(item, field, line, deny, ctx: _Ctx) -> list[FQDNSelector]:
    """toFQDNs entries, checked as Cilium's CRD does: exactly one of matchName/matchPattern, a DNS
    name (with `*` in a pattern) of <= 255 chars. Not in deny rules (Cilium has no toFQDNs there)."""
    if deny and item.get("toFQDNs"):
        _key_error(ctx, item, "toFQDNs", field, line, "toFQDNs is not supported in a deny rule")
        return []
    return _fqdn_selectors(ctx, item, "toFQDNs", field, line)


def _entities(item, key, field, line, ctx: _Ctx) -> list[str]:
    out = []
    for ent, efield, eline in _items(ctx, item, key, field, line):
        if ent not in ENTITIES:
            ctx.error(
                eline, efield, f"unknown entity {ent!r}; expected one of {', '.join(ENTITIES)}"
            )
        else:
            out.append(ent)
    return out


def _requires(item, prefix, field, line, ctx: _Ctx) -> list:
    key = f"{prefix}Requires"
    if key not in item:
        return []
    out = _selectors(ctx, item, key, field, line)
    ctx.warn(
        _ln(item, key, line),
        f"{field}.{key}",
        f"{key} is deprecated in Cilium; enforced by ANDing these selectors into every "
        f"{prefix}Endpoints selector (and every L3-wildcard allow) of the allow rules that "
        "select the same endpoints; not applied to CIDR, entity or node peers",
    )
    return out


def _not_enforced(item, field, line, deny, ctx: _Ctx) -> bool:
    """Peers named by a kind this engine does not resolve: a warning (an error in a deny rule,
    where dropping them would allow more). True when there was any."""
    found = [
        _unenforced(
            ctx,
            item,
            key,
            field,
            line,
            deny,
            error=f"{key} is not supported in a deny rule",
            warning=reason,
        )
        for key, reason in NOT_ENFORCED.items()
    ]
    return any(found)


def _names_no_peer(item, direction) -> bool:
    """`fromEndpoints: []` is present but selects nobody (Cilium: no peer)."""
    return any(
        key in item and item[key] is not None and not item[key] for key in PEER_KINDS[direction]
    )


def _authentication_drops(item, field, line, deny, ctx: _Ctx) -> bool:
    if "authentication" not in item:
        return False
    ctx.warn(
        _ln(item, "authentication", line),
        f"{field}.authentication",
        "mutual authentication is not enforced: this rule is dropped, so the traffic it would "
        "allow is not allowed" + (" (deny rule kept)" if deny else ""),
    )
    return not deny
