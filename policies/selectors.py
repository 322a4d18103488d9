"""Selector cache: which numeric identities a peer description selects.

Identities are indexed by label key so a selector only scans the identities that carry its first
`In`/`Exists` key; results are memoized per selector for one compilation.
"""

from __future__ import annotations

import bisect
import ipaddress

from policies import identity as ids
from policies.fqdn import FQDN_CIDR_SOURCE, FQDN_FAMILY_SOURCE, FQDN_SOURCE, FQDNSelector
from policies.labels import LabelSet, Selector
from policies.model import CIDRRule, Peers

_CLUSTER_RESERVED = frozenset(
    {
        ids.HOST,
        ids.UNMANAGED,
        ids.HEALTH,
        ids.INIT,
        ids.REMOTE_NODE,
        ids.KUBE_APISERVER,
        ids.INGRESS_IDENTITY,
    }
)
# The identities an unknown peer of each family gets. The datapath keeps reserved:world (2) for
# IPv4, as Cilium does with IPv6 off (the IPv4 path and its events stay as they were), and gives
# IPv6 world-ipv6 (10), as Cilium does in dual stack; world-ipv4 (9) is selected too, so a
# policy means the same wherever 9 is assigned. So world-ipv6 (and ::/0) never selects an IPv4
# peer, world-ipv4 (and 0.0.0.0/0) never an IPv6 one, and world selects both.
_WORLD_OF_FAMILY = {4: frozenset({ids.WORLD, ids.WORLD_IPV4}), 6: frozenset({ids.WORLD_IPV6})}

_ENTITY_RESERVED = {
    "host": {ids.HOST},
    "remote-node": {ids.REMOTE_NODE},
    "init": {ids.INIT},
    "health": {ids.HEALTH},
    "unmanaged": {ids.UNMANAGED},
    "kube-apiserver": {ids.KUBE_APISERVER},
    "ingress": {ids.INGRESS_IDENTITY},
    "none": set(),
}
ANY = frozenset({0})


class Universe:
    """Every identity the compilation knows, with indexes for selectors, CIDRs and entities."""

    def __init__(self, identities: dict[int, LabelSet]):
        self.identities = identities
        self.by_key: dict[str, list[int]] = {}
        self.cidr: list[tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
        by_len: dict[tuple[int, int], list[tuple[int, int]]] = {}
        self.cluster: set[int] = set()
        # learned-IP identities: (number, selector texts, policy CIDRs around its IPs, family)
        self.fqdn: list[tuple[int, frozenset[str], frozenset[str], int]] = []
        for number, labels in sorted(identities.items()):
            net = None
            if number >= ids.LOCAL_SCOPE and any(lab.source == FQDN_SOURCE for lab in labels):
                self.fqdn.append(_fqdn_entry(number, labels))
                continue
            for label in labels:
                self.by_key.setdefault(label.key, []).append(number)
                if label.source == "cidr":
                    net = ipaddress.ip_network(label.key)
            if net is not None:
                self.cidr.append((number, net))
                fam, plen, value = _bits(net)
                by_len.setdefault((fam, plen), []).append((value, number))
            elif number >= ids.FIRST_CLUSTER_ID or number in _CLUSTER_RESERVED:
                self.cluster.add(number)
        self._cidr_index = {
            key: ([v for v, _ in sorted(items)], [n for _, n in sorted(items)])
            for key, items in by_len.items()
        }
        self._endpoint_cache: dict[Selector, frozenset[int]] = {}
        self._cidr_cache: dict[CIDRRule, frozenset[int]] = {}
        self._entity_cache: dict[str, frozenset[int]] = {}

    def select_fqdn(self, sel: FQDNSelector) -> frozenset[int]:
        """The identities of the IPs learned for names this selector matches."""
        text = str(sel)
        return frozenset(n for n, sels, _, _ in self.fqdn if text in sels)

    def select_endpoints(self, sel: Selector) -> frozenset[int]:
        found = self._endpoint_cache.get(sel)
        if found is not None:
            return found
        candidates = None
        for req in sel.requirements:
            if req.operator in ("In", "Exists"):
                candidates = self.by_key.get(req.key, ())
                break
        if candidates is None:
            candidates = self.identities.keys()
        identities = self.identities
        found = frozenset(
            n
            for n in candidates
            if n < ids.LOCAL_SCOPE and n != ids.WORLD and sel.matches(identities[n])
        )
        self._endpoint_cache[sel] = found
        return found

    def select_cidr(self, rule: CIDRRule) -> frozenset[int]:
        found = self._cidr_cache.get(rule)
        if found is not None:
            return found
        out = set()
        bits, length, value = _bits(rule.cidr)
        excepts = [_bits(ex) for ex in rule.excepts]
        first = value
        last = value | ((1 << (bits - length)) - 1)
        # CIDR identities sorted by network per (family, prefix length): the ones inside the rule's
        # prefix are one bisected range at each longer-or-equal length.
        for (fam, plen), (values, numbers) in self._cidr_index.items():
            if fam != bits or plen < length:
                continue
            lo = bisect.bisect_left(values, first)
            hi = bisect.bisect_right(values, last)
            for j in range(lo, hi):
                inner = (fam, plen, values[j])
                if not any(_inside(inner, ex) for ex in excepts):
                    out.add(numbers[j])
        # a learned IP inside the prefix (and in none of its excepts) is selected too: its
        # identity names every policy CIDR around it
        own, outs = str(rule.cidr), {str(ex) for ex in rule.excepts}
        out.update(n for n, _, nets, _ in self.fqdn if own in nets and not nets & outs)
        if rule.cidr.prefixlen == 0 and not rule.excepts:
            out |= _WORLD_OF_FAMILY[rule.cidr.version]
        found = frozenset(out)
        self._cidr_cache[rule] = found
        return found

    def select_entity(self, entity: str) -> frozenset[int]:
        found = self._entity_cache.get(entity)
        if found is None:
            found = self._entity_cache[entity] = self._select_entity(entity)
        return found

    def _select_entity(self, entity: str) -> frozenset[int]:
        if entity == "all":
            return ANY
        if entity in ("world", "world-ipv4", "world-ipv6"):
            version = {"world": 0, "world-ipv4": 4, "world-ipv6": 6}[entity]
            out = set()
            for family in (4, 6):
                if version in (0, family):
                    out |= _WORLD_OF_FAMILY[family]
            out |= {n for n, net in self.cidr if version in (0, net.version)}
            out |= {n for n, _, _, fam in self.fqdn if version in (0, fam)}
            return frozenset(out)
        if entity == "cluster":
            return frozenset(self.cluster)
        return frozenset(_ENTITY_RESERVED[entity])

    def select_nodes(self, sel: Selector) -> frozenset[int]:
        out = set()
        for number in (ids.HOST, ids.REMOTE_NODE):
            labels = self.identities.get(number)
            if sel.is_wildcard or (labels is not None and sel.matches(labels)):
                out.add(number)
        return frozenset(out)

    def resolve(self, peers: Peers, requires: tuple[Selector, ...] = ()) -> frozenset[int]:
        """Identities selected by a peer description; {0} means any peer."""
        if peers.unresolved and not (
            peers.endpoints or peers.cidrs or peers.entities or peers.nodes or peers.fqdns
        ):
            return frozenset()
        if peers.wildcard:
            if not requires:
                return ANY
            return self.select_endpoints(_and(Selector(), requires))
        out: set[int] = set()
        for sel in peers.endpoints:
            out |= self.select_endpoints(_and(sel, requires) if requires else sel)
        for rule in peers.cidrs:
            out |= self.select_cidr(rule)
        for entity in peers.entities:
            found = self.select_entity(entity)
            if found is ANY:
                return ANY
            out |= found
        for sel in peers.nodes:
            out |= self.select_nodes(sel)
        for sel in peers.fqdns:
            out |= self.select_fqdn(sel)
        return frozenset(out)


def _fqdn_entry(number: int, labels: LabelSet) -> tuple[int, frozenset[str], frozenset[str], int]:
    sels = frozenset(lab.key for lab in labels if lab.source == FQDN_SOURCE)
    nets = frozenset(lab.key for lab in labels if lab.source == FQDN_CIDR_SOURCE)
    family = next((int(lab.key) for lab in labels if lab.source == FQDN_FAMILY_SOURCE), 4)
    return number, sels, nets, family


def _and(sel: Selector, requires: tuple[Selector, ...]) -> Selector:
    reqs = list(sel.requirements)
    for r in requires:
        reqs.extend(r.requirements)
    return Selector(tuple(reqs))


def _bits(net) -> tuple[int, int, int]:
    """(family bits, prefix length, network as an int): containment with two shifts."""
    return net.max_prefixlen, net.prefixlen, int(net.network_address)


def _inside(inner: tuple[int, int, int], outer: tuple[int, int, int]) -> bool:
    bits, length, value = outer
    if inner[0] != bits or inner[1] < length:
        return False
    shift = bits - length
    return (inner[2] >> shift) == (value >> shift)
