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
from collections.abc import Iterable, Mapping

from policies import fqdn
from policies import identity as ids
from policies.compiled import CompiledPolicy, EndpointPolicy
from policies.diagnostics import WARNING, Diagnostic
from policies.l7 import HttpRuleSet, KafkaRuleSet
from policies.labels import LabelSet, Selector
from policies.mapstate import (
    MapState,
    PolicyEntry,
    PolicyKey,
    covers,
    group_by_direction,
    group_by_peer,
    intersect,
    overlap_candidates,
    port_prefixes,
)
from policies.model import (
    EGRESS,
    INGRESS,
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
from policies.selection import has_named_ports, is_host, named_port_numbers, select_rules
from policies.selectors import Universe

ALL_PORTS = PortProto(0, 0, PROTO_ANY)
RULE_SETS = {"http": HttpRuleSet, "kafka": KafkaRuleSet, "dns": fqdn.DnsRuleSet}


class _Acc:
    """What the rules put on one key before closure."""

    __slots__ = ("deny", "plain", "parser", "l7", "sources")

    def __init__(self):
        self.deny = False
        self.plain = False
        self.parser = ""
        self.l7: list[tuple[str, object]] = []  # (source rule ident, rule)
        self.sources: set[str] = set()


def _proto_keys(proto: int) -> tuple[int, ...]:
    return (PROTO_TCP, PROTO_UDP, PROTO_SCTP) if proto == PROTO_ANY else (proto,)


def port_keys(pp: PortProto) -> list[tuple[int, int, int]]:
    """(proto, port, prefix_len) keys for one port/protocol entry."""
    if pp.port == 0:
        return [(pp.proto, 0, 0)]
    blocks = port_prefixes(pp.port, pp.end_port)
    return [(proto, port, plen) for proto in _proto_keys(pp.proto) for port, plen in blocks]


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
                        for proto, port, plen in port_keys(resolved):
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
        by_peer = group_by_peer(allow_keys)
        by_dir = group_by_direction(allow_keys)
        for c in l7_keys:
            for a in overlap_candidates(c, by_peer, by_dir):
                if a is not c:
                    inter = intersect(a, c)
                    if inter is not None:
                        candidates.add(inter)
        out: dict[PolicyKey, PolicyEntry] = {}
        for key in sorted(candidates):
            covering = [b for b in by_peer.get((key.identity, key.direction), ()) if covers(b, key)]
            if key.identity:
                covering += [b for b in by_peer.get((0, key.direction), ()) if covers(b, key)]
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
        allow_by_peer, allow_by_dir = group_by_peer(allowed), group_by_direction(allowed)
        for d in deny_keys:
            for a in overlap_candidates(d, allow_by_peer, allow_by_dir):
                inter = intersect(a, d)
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
        self.l7[number] = RULE_SETS[parser](rules, allow_all=allow_all, sources=sources)
        self.l7_sets[content] = number
        return number


def _cidrs(rules: Iterable[Rule]):
    for rule in rules:
        for section in (rule.ingress, rule.ingress_deny, rule.egress, rule.egress_deny):
            for pr in section:
                for c in pr.peers.cidrs:
                    yield c.cidr
                    yield from c.excepts


def _fqdn_selectors(rules: Iterable[Rule]):
    for rule in rules:
        for pr in rule.egress:
            yield from pr.peers.fqdns


class LearnedLabels:
    """What compile_policy would give a newly learned IP (the agent's fast path: when that label
    set already has an identity, only an ipcache entry is new and nothing needs compiling)."""

    def __init__(self, rules: Iterable[Rule]):
        rules = tuple(rules)
        self.selectors = tuple(dict.fromkeys(_fqdn_selectors(rules)))
        self.nets = set(_cidrs(rules))

    def labels(self, names: Iterable[str], ip: str) -> LabelSet | None:
        """The label set of `ip` if `names` are all the names it was learned for."""
        selected = fqdn.learned_ips(self.selectors, {name: (ip,) for name in names})
        return fqdn.ip_labels(selected, self.nets).get(ip)


def _learned_identities(rules, nets, learned, allocator, ipcache) -> dict[str, int]:
    """Give every learned IP that a toFQDNs selector selects the identity of its selector set
    (ipcache /32 entries); entries and identities no longer needed go away. A learned /32 wins
    over a policy CIDR's own /32 entry and comes back out when the name is forgotten."""
    selected = fqdn.learned_ips(_fqdn_selectors(rules), learned or {})
    wanted = fqdn.ip_labels(selected, nets)
    for cidr, number in ipcache.items():
        labels = allocator.labels_of(number) if number >= ids.LOCAL_SCOPE else None
        if labels is not None and fqdn.is_fqdn_identity(labels):
            ip = cidr.rsplit("/", 1)[0]
            if wanted.get(ip) != labels:
                ipcache.delete(cidr)
    return {ip: labels for ip, labels in wanted.items()}


def compile_policy(
    rules: Iterable[Rule],
    endpoints: Mapping[str, LabelSet],
    allocator: ids.IdentityAllocator,
    ipcache: ids.IPCache,
    revision: int,
    *,
    named_ports: Mapping[str, Mapping[str, int]] | None = None,
    previous: CompiledPolicy | None = None,
    learned: Mapping[str, Iterable[str]] | None = None,
) -> CompiledPolicy:
    """Deterministic: the same rules, endpoints and allocator state give the same result.

    With `previous` (the last compilation with the same allocator), endpoints whose selecting
    rules are unchanged (by value) keep their MapState object, L7 rule sets keep their ids, and
    only the rest is recompiled; the result equals a full compilation.

    `learned` is the DNS proxy's table {name: IPs its allowed answers returned}; toFQDNs peers
    resolve to the identities given here to those IPs (see policies.fqdn).
    """
    rules = tuple(rules)
    if previous is not None:
        # unchanged rules become the very objects of the last compile, so every cache lookup
        # below hits by identity instead of comparing rule trees
        canonical = {r: r for r in previous.rules}
        rules = tuple(canonical.get(r, r) for r in rules)
    diagnostics: list[Diagnostic] = []
    endpoint_ids = {name: allocator.allocate(labels) for name, labels in sorted(endpoints.items())}
    nets = set(_cidrs(rules))
    learned_labels = _learned_identities(rules, nets, learned, allocator, ipcache)
    # CIDRs no rule names any more give their identities (and ipcache entries) back first.
    for cidr, number in allocator.release_cidrs_except(nets):
        if ipcache.get(cidr) == number:
            ipcache.delete(cidr)
    for net in sorted(nets, key=lambda n: (n.version, int(n.network_address), n.prefixlen)):
        number = allocator.allocate_cidr(net)
        if ipcache.get(net) is None:
            ipcache.upsert(net, number)
    keep = set()
    for ip, labels in sorted(learned_labels.items()):
        number = allocator.allocate(labels)
        keep.add(number)
        ipcache.upsert(ip, number)
    allocator.release_fqdn_except(keep)
    identities = allocator.identities()
    for labels in endpoints.values():
        if is_host(labels) and len(labels) > 1:
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
    selecting_by_ep, selected = select_rules(rules, endpoints, reuse_selected)
    maps: dict[tuple, MapState] = {}
    out: dict[str, EndpointPolicy] = {}
    for name in sorted(endpoints):
        selecting = selecting_by_ep[name]
        enforced = (
            any(r.has_ingress and r.default_deny_ingress for r in selecting),
            any(r.has_egress and r.default_deny_egress for r in selecting),
        )
        uses_named = named_ports and any(has_named_ports(r) for r in selecting)
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
