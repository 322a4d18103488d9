"""Numeric security identities and the IP -> identity cache.

Identities are allocated from identity-relevant labels and survive restarts through
`to_state()`/`IdentityAllocator(state)`; the caller persists the dict (a JSON file today).
"""

from __future__ import annotations

import bisect
import functools
import ipaddress
from collections.abc import Iterable

from policies.labels import Label, LabelSet

HOST = 1
WORLD = 2
UNMANAGED = 3
HEALTH = 4
INIT = 5
REMOTE_NODE = 6
KUBE_APISERVER = 7
INGRESS_IDENTITY = 8  # reserved:ingress (Cilium's Ingress/Gateway proxy); not a direction
WORLD_IPV4 = 9
WORLD_IPV6 = 10

RESERVED = {
    HOST: "host",
    WORLD: "world",
    UNMANAGED: "unmanaged",
    HEALTH: "health",
    INIT: "init",
    REMOTE_NODE: "remote-node",
    KUBE_APISERVER: "kube-apiserver",
    INGRESS_IDENTITY: "ingress",
    WORLD_IPV4: "world-ipv4",
    WORLD_IPV6: "world-ipv6",
}
RESERVED_BY_NAME = {name: number for number, name in RESERVED.items()}

FIRST_CLUSTER_ID = 256  # Cilium's first cluster-scope identity
LOCAL_SCOPE = 1 << 24  # CIDR identities and those of IPs learned from DNS live here
_LOCAL_SOURCES = ("cidr", "fqdn")  # node-local label sources: never sent to other nodes
STATE_VERSION = 1

# Labels that change per pod or per rollout say nothing about who an endpoint is (Cilium's
# default identity-relevant filter drops the same kinds); keeping them would give every pod of a
# deployment its own identity.
_IRRELEVANT_PREFIXES = (
    "io.kubernetes.pod.uid",
    "controller-revision-hash",
    "pod-template-hash",
    "pod-template-generation",
    "controller-uid",
    "job-name",
    "batch.kubernetes.io/",
    "statefulset.kubernetes.io/pod-name",
    "annotation.",
)


def reserved_labels(identity: int) -> LabelSet:
    return LabelSet([Label("reserved", RESERVED[identity], "")])


def cidr_labels(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> LabelSet:
    world = "world-ipv4" if net.version == 4 else "world-ipv6"
    return LabelSet([Label("cidr", str(net), ""), Label("reserved", world, "")])


def identity_relevant(labels: LabelSet) -> LabelSet:
    return LabelSet(lab for lab in labels if not lab.key.startswith(_IRRELEVANT_PREFIXES))


def reserved_of(labels: LabelSet) -> int | None:
    """The reserved identity of a label set that carries a `reserved:` label (and no `cidr:`
    label): `reserved:host` alone or with node labels is HOST."""
    if any(lab.source in _LOCAL_SOURCES for lab in labels):
        return None
    for lab in labels:
        if lab.source == "reserved" and lab.key in RESERVED_BY_NAME:
            return RESERVED_BY_NAME[lab.key]
    return None


class IdentityAllocator:
    """Label set <-> numeric identity. Deterministic: the same allocation order gives the same ids,
    and a restored state keeps every previous id."""

    def __init__(self, state: dict | None = None):
        self._by_labels: dict[LabelSet, int] = {}
        self._by_id: dict[int, LabelSet] = {}
        self._next_cluster = FIRST_CLUSTER_ID
        self._next_local = LOCAL_SCOPE + 1
        for number in RESERVED:
            self._by_id[number] = reserved_labels(number)
            self._by_labels[reserved_labels(number)] = number
        if state:
            self._restore(state)

    def _restore(self, state: dict) -> None:
        for entry in state.get("identities", []):
            number = int(entry["id"])
            labels = LabelSet(_label_from_str(s) for s in entry["labels"])
            self._by_id[number] = labels
            self._by_labels[labels] = number
            if number >= LOCAL_SCOPE:
                self._next_local = max(self._next_local, number + 1)
            elif number >= FIRST_CLUSTER_ID:
                self._next_cluster = max(self._next_cluster, number + 1)
        self._next_cluster = max(self._next_cluster, int(state.get("next_cluster", 0)))
        self._next_local = max(self._next_local, int(state.get("next_local", 0)))

    def allocate(self, labels: LabelSet) -> int:
        known = self._by_labels.get(labels)  # keys are already identity-relevant
        if known is not None:
            return known
        labels = identity_relevant(labels)
        known = self._by_labels.get(labels)
        if known is not None:
            return known
        reserved = reserved_of(labels)
        if reserved is not None:
            return reserved
        if any(lab.source in _LOCAL_SOURCES for lab in labels):
            number = self._next_local
            self._next_local += 1
        else:
            number = self._next_cluster
            self._next_cluster += 1
            if number >= LOCAL_SCOPE:
                raise OverflowError("cluster identity space exhausted")
        self._by_labels[labels] = number
        self._by_id[number] = labels
        return number

    def allocate_cidr(self, net) -> int:
        return self.allocate(cidr_labels(ipaddress.ip_network(net)))

    def lookup(self, labels: LabelSet) -> int | None:
        return self._by_labels.get(identity_relevant(labels))

    def labels_of(self, identity: int) -> LabelSet | None:
        return self._by_id.get(identity)

    def learn(self, number: int, labels: Iterable[str]) -> LabelSet:
        """Take an identity allocated elsewhere (the cluster's kvstore) into this cache, so
        compiles and lookups here see the same number as every other node."""
        labelset = LabelSet(_label_from_str(s) for s in labels)
        old = self._by_id.get(number)
        if old is not None and old != labelset:
            self._by_labels.pop(old, None)
        self._by_id[number] = labelset
        self._by_labels[labelset] = number
        if FIRST_CLUSTER_ID <= number < LOCAL_SCOPE:
            self._next_cluster = max(self._next_cluster, number + 1)
        return labelset

    def release(self, identity: int) -> None:
        if identity in RESERVED:
            return
        labels = self._by_id.pop(identity, None)
        if labels is not None:
            self._by_labels.pop(labels, None)

    def release_cidrs_except(self, keep) -> list[tuple[str, int]]:
        """Release every CIDR identity whose prefix is not in `keep` (a set of ip_network); returns
        the released (cidr, identity) pairs. A long-running agent or gateway recompiles for as long
        as it runs: without this, every CIDR any policy ever named would keep its identity."""
        wanted = {str(net) for net in keep}
        released = []
        for number, labels in list(self._by_id.items()):
            if number < LOCAL_SCOPE:
                continue
            cidrs = [lab.key for lab in labels if lab.source == "cidr"]
            if cidrs and cidrs[0] not in wanted:
                self.release(number)
                released.append((cidrs[0], number))
        return released

    def release_fqdn_except(self, keep: set[int]) -> list[int]:
        """Release every learned-IP identity (an `fqdn:` label) not in `keep`; returns them."""
        released = []
        for number, labels in list(self._by_id.items()):
            if number >= LOCAL_SCOPE and number not in keep:
                if any(lab.source == "fqdn" for lab in labels):
                    self.release(number)
                    released.append(number)
        return released

    def identities(self) -> dict[int, LabelSet]:
        """Every known identity (reserved, cluster and local), by number."""
        return dict(self._by_id)

    def to_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "next_cluster": self._next_cluster,
            "next_local": self._next_local,
            "identities": [
                {"id": number, "labels": labels.to_strings()}
                for number, labels in sorted(self._by_id.items())
                if number not in RESERVED
            ],
        }


def _label_from_str(text: str) -> Label:
    head, _, value = text.partition("=")
    source, sep, key = head.partition(":")
    if not sep:
        return Label("unspec", head, value)
    if source == "cidr":
        # cidr:10.0.0.0/8 has ':' inside IPv6 prefixes; keep everything after the source.
        return Label("cidr", key, value)
    return Label(source, key, value)


class IPCache:
    """IP prefix -> identity with longest-prefix lookup; unknown addresses are WORLD (IPv4) or
    WORLD_IPV6 (IPv6), as the datapath gives them."""

    def __init__(self, entries: Iterable[tuple[str, int]] = ()):
        # per (version, prefix_len): {network_int: identity}
        self._tables: dict[tuple[int, int], dict[int, int]] = {}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}
        for cidr, identity in entries:
            self.upsert(cidr, identity)

    def upsert(self, cidr, identity: int) -> None:
        net = _net(cidr)
        key = (net.version, net.prefixlen)
        table = self._tables.get(key)
        if table is None:
            table = self._tables[key] = {}
            lengths = self._lengths[net.version]
            bisect.insort(lengths, -net.prefixlen)  # longest first
        table[int(net.network_address)] = identity

    def get(self, cidr) -> int | None:
        net = _net(cidr)
        table = self._tables.get((net.version, net.prefixlen))
        return table.get(int(net.network_address)) if table else None

    def delete(self, cidr) -> None:
        net = _net(cidr)
        table = self._tables.get((net.version, net.prefixlen))
        if table:
            table.pop(int(net.network_address), None)

    def lookup(self, ip) -> int:
        return self._find(*_version_value(ip))[0]

    def lookup_prefix(self, ip) -> tuple[int, str | None]:
        version, value = _version_value(ip)
        identity, length, masked = self._find(version, value)
        if length < 0:
            return identity, None
        return identity, f"{_addr(version, masked)}/{length}"

    def _find(self, version: int, value: int) -> tuple[int, int, int]:
        """(identity, prefix length or -1 for none, masked address) of the longest match."""
        bits = 32 if version == 4 else 128
        for neg in self._lengths[version]:
            length = -neg
            masked = value >> (bits - length) << (bits - length) if length else 0
            identity = self._tables[(version, length)].get(masked)
            if identity is not None:
                return identity, length, masked
        return (WORLD if version == 4 else WORLD_IPV6), -1, 0

    def items(self) -> list[tuple[str, int]]:
        out = []
        for (version, length), table in sorted(self._tables.items()):
            for value, identity in sorted(table.items()):
                out.append((f"{_addr(version, value)}/{length}", identity))
        return out


def _version_value(ip) -> tuple[int, int]:
    """(4 or 6, the address as an integer). The proxies look up a peer per new connection, and
    the peers repeat: a cached answer takes 0.1 us where an ipaddress object took 1.5 us
    (IPv4) to 5 us (IPv6)."""
    if isinstance(ip, str):
        return _parsed(ip)
    addr = ipaddress.ip_address(ip)
    return addr.version, int(addr)


@functools.lru_cache(maxsize=4096)
def _parsed(text: str) -> tuple[int, int]:
    addr = ipaddress.ip_address(text)
    return addr.version, int(addr)


def _net(cidr):
    text = str(cidr)
    if "/" not in text:
        addr = ipaddress.ip_address(text)
        return ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")
    return ipaddress.ip_network(text, strict=False)


def _addr(version: int, value: int):
    return ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value)
