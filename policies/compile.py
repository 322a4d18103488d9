"""Compile rules + endpoints + identities into one MapState per endpoint and shared L7 rule sets.

Order of work for one endpoint (Cilium's semantics):
1. the rules that select it decide whether ingress/egress are enforced (default deny);
2. every allow/deny peer rule becomes keys (peer identity, direction, proto, port prefix);
3. L7 closure: wherever an L7 key and another allow key overlap, the overlap gets a redirect whose
   rule set is the union of every allow covering it; a plain L4 allow covering it adds allow-all;
4. deny closure: wherever a deny and an allow overlap, the overlap is written as deny, so the most
   specific key always carries the right answer (the BPF side does a most-specific lookup);
5. a direction that is not enforced but has entries gets a wildcard allow, so denies still work.
Endpoints selected by the same rules share one MapState object.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from policies import identity as ids
from policies.diagnostics import WARNING, Diagnostic
from policies.l7 import HttpRuleSet, KafkaRuleSet
from policies.labels import LabelSet, Selector
from policies.mapstate import (
    EGRESS,
    INGRESS,
    MapChanges,
    MapState,
    PolicyEntry,
    PolicyKey,
    diff_maps,
    port_prefixes,
)
from policies.model import (
    PROTO_ANY,
    PROTO_ICMP,
    PROTO_ICMPV6,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    PeerRule,
    PortProto,
    Rule,
)
from policies.selectors import Universe

ALL_PORTS = PortProto(0, 0, PROTO_ANY)


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


class _Acc:
    """What the rules put on one key before closure."""

    __slots__ = ("deny", "plain", "parser", "l7", "sources")

    def __init__(self):
        self.deny = False
        self.plain = False
        self.parser = ""
        self.l7: list[tuple[str, object]] = []  # (source rule ident, rule)
        self.sources: set[str] = set()


def _is_host(labels: LabelSet) -> bool:
    return any(label.source == "reserved" and label.key == "host" for label in labels)


def selects(rule: Rule, labels: LabelSet) -> bool:
    if _is_host(labels):
        return rule.node_selector is not None and rule.node_selector.matches(labels)
    return rule.selector is not None and rule.selector.matches(labels)


def _proto_keys(proto: int) -> tuple[int, ...]:
    return (PROTO_TCP, PROTO_UDP, PROTO_SCTP) if proto == PROTO_ANY else (proto,)


def _port_keys(pp: PortProto) -> list[tuple[int, int, int]]:
    """(proto, port, prefix_len) keys for one port/protocol entry."""
    if pp.port == 0:
        return [(pp.proto, 0, 0)]
    blocks = port_prefixes(pp.port, pp.end_port)
    return [(proto, port, plen) for proto in _proto_keys(pp.proto) for port, plen in blocks]


def named_port_numbers(
    named_ports: Mapping[str, Mapping[str, int]], name: str, direction: int, own: str
) -> list[int]:
    """The numbers a policy's port `name` stands for on endpoint `own`: for ingress the names
    `own` itself gave its ports, for egress any endpoint's (the peers')."""
    if direction == INGRESS:
        tables = [named_ports.get(own, {})]
    else:
        tables = list(named_ports.values())
    return sorted({t[name] for t in tables if name in t})


class _Compiler:
    def __init__(self, rules, universe: Universe, named_ports, diagnostics):
        self.rules = rules
        self.universe = universe
        self.named_ports = named_ports or {}
        self.diagnostics = diagnostics
        self.l7_sets: dict[tuple, int] = {}
        self.l7: dict[int, HttpRuleSet | KafkaRuleSet] = {}
        self.reported: set[tuple] = set()

    def _warn_once(self, rule: Rule, line: int, field: str, reason: str) -> None:
        key = (rule.file, line, field, reason)
        if key not in self.reported:
            self.reported.add(key)
            self.diagnostics.append(Diagnostic(rule.file, line, field, reason, WARNING))

    def _resolve_named(self, pp: PortProto, rule: Rule, pr: PeerRule, direction: int, own: str):
        if not pp.name:
            return [pp]
        numbers = named_port_numbers(self.named_ports, pp.name, direction, own)
        if not numbers:
            self._warn_once(
                rule,
                pr.line,
                "toPorts.ports.port",
                f"named port {pp.name!r} is not known for the {'selected' if direction == INGRESS else 'peer'} "
                "endpoints: nothing is allowed on it",
            )
            return []
        return [PortProto(n, n, pp.proto) for n in numbers]

    def endpoint_map(
        self, selecting: list[Rule], own_name: str, enforced: tuple[bool, bool]
    ) -> MapState:
        acc: dict[PolicyKey, _Acc] = {}
        for direction in (INGRESS, EGRESS):
            requires: list[Selector] = []
            for rule in selecting:
                allow, deny = rule.sections(direction)
                for pr in (*allow, *deny):
                    requires.extend(pr.requires)
            req = tuple(requires)
            # The same peer rule often appears in many policies (a shared "deny world" say):
            # compute its keys once and credit every policy it came from.
            groups: dict[tuple[PeerRule, bool], list[Rule]] = {}
            for rule in selecting:
                allow, deny = rule.sections(direction)
                for pr in deny:
                    groups.setdefault((pr, True), []).append(rule)
                for pr in allow:
                    groups.setdefault((pr, False), []).append(rule)
            for (pr, is_deny), rules in groups.items():
                self._add_peer_rule(
                    acc, rules, pr, direction, is_deny, () if is_deny else req, own_name
                )
        entries = self._close(acc)
        for direction in (INGRESS, EGRESS):
            if not enforced[direction] and any(k.direction == direction for k in entries):
                key = PolicyKey(0, direction, 0, 0, 0)
                if key not in entries:
                    entries[key] = PolicyEntry(False, 0, ("default-allow",))
        return MapState(entries)

    def _add_peer_rule(self, acc, rules, pr: PeerRule, direction, deny, requires, own_name):
        peers = self.universe.resolve(pr.peers, requires)
        if not peers:
            return
        rule = rules[0]
        idents = {r.ident for r in rules}
        port_entries: list[tuple[int, int, int, object]] = []  # proto, port, plen, L7Rules|None
        if pr.icmps:
            for f in pr.icmps:
                proto = PROTO_ICMP if f.family == "IPv4" else PROTO_ICMPV6
                port_entries.append((proto, f.type, 16, None))
        elif not pr.ports:
            port_entries.append((0, 0, 0, None))
        else:
            for port_rule in pr.ports:
                for pp in port_rule.ports or (ALL_PORTS,):
                    for resolved in self._resolve_named(pp, rule, pr, direction, own_name):
                        for proto, port, plen in _port_keys(resolved):
                            port_entries.append((proto, port, plen, port_rule.l7))
        for peer in sorted(peers):
            for proto, port, plen, l7 in port_entries:
                key = PolicyKey(peer, direction, proto, port, plen)
                a = acc.get(key)
                if a is None:
                    a = acc[key] = _Acc()
                a.sources |= idents
                if deny:
                    a.deny = True
                elif l7 is None:
                    a.plain = True
                else:
                    if a.parser and a.parser != l7.parser:
                        self._warn_once(
                            rule,
                            pr.line,
                            "toPorts.rules",
                            f"port {key.port_text()} already has {a.parser} rules from another "
                            f"policy; {l7.parser} on the same port is a conflict: the port is denied",
                        )
                        a.deny = True
                    a.parser = a.parser or l7.parser
                    # an empty list adds no rule: alone, the port denies every request
                    a.l7.extend((ident, r) for ident in idents for r in l7.rules)

    def _close(self, acc: dict[PolicyKey, _Acc]) -> dict[PolicyKey, PolicyEntry]:
        keys = list(acc)
        allow_keys = [k for k in keys if not acc[k].deny]
        deny_keys = [k for k in keys if acc[k].deny]
        l7_keys = [k for k in allow_keys if acc[k].parser]
        candidates = set(allow_keys)
        by_peer = _group(allow_keys)
        by_dir = _group_dir(allow_keys)
        for c in l7_keys:
            for a in _overlap_candidates(c, by_peer, by_dir):
                if a is not c:
                    inter = _intersect(a, c)
                    if inter is not None:
                        candidates.add(inter)
        out: dict[PolicyKey, PolicyEntry] = {}
        for key in sorted(candidates):
            covering = [
                b for b in by_peer.get((key.identity, key.direction), ()) if _covers(b, key)
            ]
            if key.identity:
                covering += [b for b in by_peer.get((0, key.direction), ()) if _covers(b, key)]
            parsers = {acc[b].parser for b in covering if acc[b].parser}
            sources = tuple(sorted({s for b in covering for s in acc[b].sources}))
            if not parsers:
                out[key] = PolicyEntry(False, 0, sources)
                continue
            if len(parsers) > 1:
                out[key] = PolicyEntry(True, 0, (*sources, "l7-parser-conflict"))
                continue
            parser = parsers.pop()
            plain = any(acc[b].plain for b in covering)
            l7_rules = sorted(
                {(src, r) for b in covering for src, r in acc[b].l7},
                key=lambda sr: (sr[0], str(sr[1]), repr(sr[1])),
            )
            out[key] = PolicyEntry(False, self._l7_id(parser, l7_rules, plain), sources)
        # deny closure: a deny wins everywhere it overlaps an allow
        for d in deny_keys:
            dsrc = tuple(sorted(acc[d].sources))
            out[d] = PolicyEntry(True, 0, dsrc)
        allowed = [k for k, e in out.items() if not e.deny]
        allow_by_peer, allow_by_dir = _group(allowed), _group_dir(allowed)
        for d in deny_keys:
            for a in _overlap_candidates(d, allow_by_peer, allow_by_dir):
                inter = _intersect(a, d)
                if inter is None:
                    continue
                prev = out.get(inter)
                if prev is None or not prev.deny:
                    out[inter] = PolicyEntry(True, 0, tuple(sorted(acc[d].sources)))
        return out

    def _l7_id(self, parser: str, l7_rules, allow_all: bool) -> int:
        rules = tuple(r for _, r in l7_rules)
        sources = tuple(s for s, _ in l7_rules)
        content = (parser, rules, sources, allow_all)
        known = self.l7_sets.get(content)
        if known is not None:
            return known
        digest = hashlib.blake2b(repr(content).encode(), digest_size=4).digest()
        number = int.from_bytes(digest, "big") & 0x7FFFFFFF or 1
        while number in self.l7:
            number = number % 0x7FFFFFFF + 1
        cls = HttpRuleSet if parser == "http" else KafkaRuleSet
        self.l7[number] = cls(rules, allow_all=allow_all, sources=sources)
        self.l7_sets[content] = number
        return number


def _group(keys: Iterable[PolicyKey]) -> dict[tuple[int, int], list[PolicyKey]]:
    out: dict[tuple[int, int], list[PolicyKey]] = {}
    for k in keys:
        out.setdefault((k.identity, k.direction), []).append(k)
    return out


def _group_dir(keys: Iterable[PolicyKey]) -> dict[int, list[PolicyKey]]:
    out: dict[int, list[PolicyKey]] = {}
    for k in keys:
        out.setdefault(k.direction, []).append(k)
    return out


def _overlap_candidates(key: PolicyKey, by_peer, by_dir) -> list[PolicyKey]:
    """Keys that can overlap `key`: same peer or any-peer keys; every key for an any-peer key."""
    if key.identity == 0:
        return by_dir.get(key.direction, [])
    return by_peer.get((key.identity, key.direction), []) + by_peer.get((0, key.direction), [])


def _covers(b: PolicyKey, k: PolicyKey) -> bool:
    """b's key space contains k's."""
    if b.direction != k.direction:
        return False
    if b.identity not in (0, k.identity):
        return False
    if b.proto not in (0, k.proto):
        return False
    if b.prefix_len > k.prefix_len:
        return False
    shift = 16 - b.prefix_len
    return (k.port >> shift) == (b.port >> shift)


def _intersect(a: PolicyKey, b: PolicyKey) -> PolicyKey | None:
    if a.direction != b.direction:
        return None
    if a.identity and b.identity and a.identity != b.identity:
        return None
    if a.proto and b.proto and a.proto != b.proto:
        return None
    narrow, wide = (a, b) if a.prefix_len >= b.prefix_len else (b, a)
    shift = 16 - wide.prefix_len
    if (narrow.port >> shift) != (wide.port >> shift):
        return None
    return PolicyKey(
        a.identity or b.identity, a.direction, a.proto or b.proto, narrow.port, narrow.prefix_len
    )


def _cidrs(rules: Iterable[Rule]):
    for rule in rules:
        for section in (rule.ingress, rule.ingress_deny, rule.egress, rule.egress_deny):
            for pr in section:
                for c in pr.peers.cidrs:
                    yield c.cidr
                    yield from c.excepts


def compile_policy(
    rules: Iterable[Rule],
    endpoints: Mapping[str, LabelSet],
    allocator: ids.IdentityAllocator,
    ipcache: ids.IPCache,
    revision: int,
    *,
    named_ports: Mapping[str, Mapping[str, int]] | None = None,
    previous: CompiledPolicy | None = None,
) -> CompiledPolicy:
    """Deterministic: the same rules, endpoints and allocator state give the same result.

    With `previous` (the last compilation with the same allocator), endpoints whose selecting
    rules are unchanged (by value) keep their MapState object, L7 rule sets keep their ids, and
    only the rest is recompiled; the result equals a full compilation.
    """
    rules = tuple(rules)
    if previous is not None:
        # unchanged rules become the very objects of the last compile, so every cache lookup
        # below hits by identity instead of comparing rule trees
        canonical = {r: r for r in previous.rules}
        rules = tuple(canonical.get(r, r) for r in rules)
    diagnostics: list[Diagnostic] = []
    endpoint_ids = {name: allocator.allocate(labels) for name, labels in sorted(endpoints.items())}
    for net in sorted(
        set(_cidrs(rules)), key=lambda n: (n.version, int(n.network_address), n.prefixlen)
    ):
        number = allocator.allocate_cidr(net)
        if ipcache.get(net) is None:
            ipcache.upsert(net, number)
    identities = allocator.identities()
    for labels in endpoints.values():
        if _is_host(labels) and len(labels) > 1:
            # the local node's labels (kubernetes.io/hostname...) are what fromNodes selects
            identities[ids.HOST] = identities[ids.HOST].with_labels(labels)
    universe = Universe(identities)
    compiler = _Compiler(rules, universe, named_ports, diagnostics)
    reuse: dict = {}
    reuse_selected = None
    if previous is not None and previous._endpoints == dict(endpoints):
        reuse_selected = previous._selected
    if (
        previous is not None
        and previous._universe == identities
        and previous._named_ports == named_ports
    ):
        reuse = previous._maps
        compiler.l7_sets.update(previous._l7_sets)
        compiler.l7.update(previous.l7)
        diagnostics.extend(previous.diagnostics)
        compiler.reported.update((d.file, d.line, d.field, d.reason) for d in previous.diagnostics)
    selecting_by_ep, selected = _selecting(rules, endpoints, reuse_selected)
    maps: dict[tuple, MapState] = {}
    out: dict[str, EndpointPolicy] = {}
    for name in sorted(endpoints):
        selecting = selecting_by_ep[name]
        enforced = (
            any(r.has_ingress and r.default_deny_ingress for r in selecting),
            any(r.has_egress and r.default_deny_egress for r in selecting),
        )
        uses_named = named_ports and any(_has_named_ports(r) for r in selecting)
        cache_key = (tuple(selecting), enforced, name if uses_named else None)
        state = maps.get(cache_key)
        if state is None:
            state = reuse.get(cache_key)
            if state is None:
                state = compiler.endpoint_map(selecting, name, enforced)
            maps[cache_key] = state
        out[name] = EndpointPolicy(
            endpoint_ids[name], enforced[0], enforced[1], state, tuple(r.ident for r in selecting)
        )
    used = {e.l7_id for state in maps.values() for e in state.values() if e.l7_id}
    l7 = {number: rs for number, rs in sorted(compiler.l7.items()) if number in used}
    l7_sets = {content: number for content, number in compiler.l7_sets.items() if number in used}
    if reuse:
        live_files = {r.file for r in rules}
        diagnostics[:] = [d for d in dict.fromkeys(diagnostics) if d.file in live_files]
    return CompiledPolicy(
        revision,
        out,
        l7,
        diagnostics,
        rules,
        _universe=identities,
        _maps=maps,
        _l7_sets=l7_sets,
        _named_ports=named_ports,
        _endpoints=dict(endpoints),
        _selected=selected,
    )


def _selecting(
    rules: tuple[Rule, ...], endpoints: Mapping[str, LabelSet], reuse: dict | None = None
) -> tuple[dict[str, list[Rule]], dict[Rule, tuple[str, ...]]]:
    """For each endpoint, the rules that select it (in rule order), via a label index so a rule
    only tests the endpoints that carry its first `In` label. `reuse` holds the endpoints each
    rule selected last time (valid when the endpoints did not change)."""
    out: dict[str, list[Rule]] = {name: [] for name in endpoints}
    selected: dict[Rule, tuple[str, ...]] = {}
    hosts = [name for name, labels in endpoints.items() if _is_host(labels)]
    host_set = set(hosts)
    index: dict[tuple[str, str], list[str]] = {}
    by_key: dict[str, list[str]] = {}
    for name, labels in endpoints.items():
        if name in host_set:
            continue
        for label in labels:
            index.setdefault((label.key, label.value), []).append(name)
            by_key.setdefault(label.key, []).append(name)
    pods = [name for name in endpoints if name not in host_set]
    for rule in rules:
        known = reuse.get(rule) if reuse else None
        if known is not None:
            for name in known:
                out[name].append(rule)
            selected[rule] = known
            continue
        sel = rule.selector
        if sel is not None:
            candidates = pods
            for req in sel.requirements:
                if req.operator == "In":
                    found: list[str] = []
                    for value in req.values:
                        found.extend(index.get((req.key, value), ()))
                    candidates = found
                    break
                if req.operator == "Exists":
                    candidates = by_key.get(req.key, [])
                    break
            names = [name for name in dict.fromkeys(candidates) if sel.matches(endpoints[name])]
        else:
            names = []
        if rule.node_selector is not None:
            names += [name for name in hosts if rule.node_selector.matches(endpoints[name])]
        for name in names:
            out[name].append(rule)
        selected[rule] = tuple(names)
    return out, selected


def _has_named_ports(rule: Rule) -> bool:
    for section in (rule.ingress, rule.egress):
        for pr in section:
            for port_rule in pr.ports:
                if any(pp.name for pp in port_rule.ports):
                    return True
    return False


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


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


__all__ = [
    "CompiledPolicy",
    "EndpointPolicy",
    "L4Verdict",
    "compile_policy",
    "diff",
    "l4_verdict",
    "selects",
    "EGRESS",
    "INGRESS",
]
