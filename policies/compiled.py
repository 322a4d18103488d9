"""What compilation produces and how it is read: per-endpoint MapStates, the shared L7 rule sets,
the L4 verdict of one packet's key, and the map changes between two compilations."""

from __future__ import annotations

from dataclasses import dataclass, field

from policies.diagnostics import Diagnostic
from policies.l7 import HttpRuleSet, KafkaRuleSet
from policies.mapstate import MapChanges, MapState, PolicyEntry, diff_maps
from policies.model import INGRESS, Rule


@dataclass(slots=True)
class EndpointPolicy:
    identity: int
    ingress_enforced: bool
    egress_enforced: bool
    map_state: MapState
    rules: tuple[str, ...] = ()  # idents of the rules that select this endpoint


@dataclass(slots=True)
class CompiledPolicy:
    revision: int
    endpoints: dict[str, EndpointPolicy]
    l7: dict[int, HttpRuleSet | KafkaRuleSet]
    diagnostics: list[Diagnostic] = field(default_factory=list)
    rules: tuple[Rule, ...] = ()
    # reuse state for `compile_policy(..., previous=...)`: identities seen, MapState per
    # (selecting rules by value, enforcement, named-port owner), L7 content -> id
    _universe: dict = field(default_factory=dict, repr=False)
    _maps: dict = field(default_factory=dict, repr=False)
    _l7_sets: dict = field(default_factory=dict, repr=False)
    _named_ports: object = field(default=None, repr=False)
    _endpoints: dict = field(default_factory=dict, repr=False)
    _selected: dict = field(default_factory=dict, repr=False)

    def endpoint(self, name: str) -> EndpointPolicy:
        return self.endpoints[name]


@dataclass(slots=True)
class L4Verdict:
    action: str  # "deny" | "allow" | "redirect"
    l7_id: int
    reason: str
    entry: PolicyEntry | None


def diff(old: CompiledPolicy | None, new: CompiledPolicy) -> dict[str, MapChanges]:
    """Per endpoint: the adds and deletes that turn old's MapState into new's.

    Endpoints gone from `new` get all their keys deleted; unchanged endpoints are left out.
    """
    out: dict[str, MapChanges] = {}
    memo: dict[tuple[int, int], MapChanges] = {}
    old_eps = old.endpoints if old is not None else {}
    for name, ep in new.endpoints.items():
        prev = old_eps.get(name)
        prev_state = prev.map_state if prev is not None else None
        if prev_state is ep.map_state:
            continue
        pair = (id(prev_state), id(ep.map_state))
        changes = memo.get(pair)
        if changes is None:
            changes = memo[pair] = diff_maps(prev_state, ep.map_state)
        if changes:
            out[name] = changes
    for name, ep in old_eps.items():
        if name not in new.endpoints:
            out[name] = MapChanges({}, tuple(sorted(ep.map_state.keys())))
    return out


def l4_verdict(
    compiled: CompiledPolicy,
    endpoint: str,
    peer_identity: int,
    direction: int,
    proto: int,
    port: int,
) -> L4Verdict:
    ep = compiled.endpoints.get(endpoint)
    if ep is None:
        return L4Verdict("allow", 0, f"endpoint {endpoint!r} is not managed by policy", None)
    entry = ep.map_state.lookup(peer_identity, direction, proto, port)
    enforced = ep.ingress_enforced if direction == INGRESS else ep.egress_enforced
    dname = "ingress" if direction == INGRESS else "egress"
    if entry is None:
        if enforced:
            return L4Verdict("deny", 0, f"{dname} is default-deny and no rule allows it", None)
        return L4Verdict(
            "allow", 0, f"{dname} is not enforced (no selecting rule has an {dname} section)", None
        )
    by = ", ".join(entry.derived_from)
    if entry.deny:
        return L4Verdict("deny", 0, f"denied by {by}", entry)
    if entry.l7_id:
        return L4Verdict(
            "redirect",
            entry.l7_id,
            f"redirected to the proxy (L7 rule set {entry.l7_id}) by {by}",
            entry,
        )
    return L4Verdict("allow", 0, f"allowed by {by}", entry)
