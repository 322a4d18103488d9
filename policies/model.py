"""The parsed policy model: what a rule says, independent of any endpoint or identity."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, fields

from policies.fqdn import FQDNSelector
from policies.labels import Selector

INGRESS = 0
EGRESS = 1
DIRECTION_NAMES = {INGRESS: "ingress", EGRESS: "egress"}

PROTO_ANY = 0
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_SCTP = 132
PROTO_NUMBERS = {"ANY": PROTO_ANY, "TCP": PROTO_TCP, "UDP": PROTO_UDP, "SCTP": PROTO_SCTP}
PROTO_NAMES = {
    PROTO_ANY: "ANY",
    PROTO_TCP: "TCP",
    PROTO_UDP: "UDP",
    PROTO_SCTP: "SCTP",
    PROTO_ICMP: "ICMP",
    PROTO_ICMPV6: "ICMPv6",
}

ENTITIES = (
    "all",
    "world",
    "world-ipv4",
    "world-ipv6",
    "host",
    "remote-node",
    "cluster",
    "init",
    "health",
    "unmanaged",
    "kube-apiserver",
    "ingress",
    "none",
)


@dataclass(frozen=True, slots=True)
class CIDRRule:
    cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    excepts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def __str__(self) -> str:
        if self.excepts:
            return f"{self.cidr} except {', '.join(map(str, self.excepts))}"
        return str(self.cidr)


@dataclass(frozen=True, slots=True)
class Peers:
    """Who is on the other side. `wildcard` means no L3 restriction (any peer)."""

    endpoints: tuple[Selector, ...] = ()
    cidrs: tuple[CIDRRule, ...] = ()
    entities: tuple[str, ...] = ()
    nodes: tuple[Selector, ...] = ()
    fqdns: tuple[FQDNSelector, ...] = ()  # toFQDNs: the IPs DNS answers gave for these names
    wildcard: bool = False
    # Set when the section named peers only through unsupported fields (toFQDNs, toServices):
    # such a rule allows nothing (fail closed).
    unresolved: bool = False

    def describe(self) -> str:
        if self.wildcard:
            return "any peer"
        parts = [f"endpoints {s}" for s in self.endpoints]
        parts += [f"cidr {c}" for c in self.cidrs]
        parts += [f"entity {e}" for e in self.entities]
        parts += [f"nodes {s}" for s in self.nodes]
        parts += [f"fqdn {s}" for s in self.fqdns]
        if parts:
            return "; ".join(parts)
        if self.unresolved:
            return "no peer (its unsupported fields are not enforced; see the warnings)"
        return "no peer (an empty rule only turns on default deny)"


@dataclass(frozen=True, slots=True)
class PortProto:
    port: int  # 0 = all ports
    end_port: int  # == port for a single port
    proto: int  # PROTO_*
    name: str = ""  # a named port, resolved at compile time

    def __str__(self) -> str:
        proto = PROTO_NAMES.get(self.proto, str(self.proto))
        if self.name:
            return f"{self.name}/{proto}"
        if self.port == 0:
            return f"*/{proto}"
        if self.end_port != self.port:
            return f"{self.port}-{self.end_port}/{proto}"
        return f"{self.port}/{proto}"


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str
    value: str | None  # None = presence only
    mismatch: str = ""  # "" (must match), LOG, ADD, DELETE, REPLACE


@dataclass(frozen=True, slots=True)
class HttpRule:
    method: str = ""
    path: str = ""
    host: str = ""
    headers: tuple[HeaderMatch, ...] = ()

    def __str__(self) -> str:
        parts = []
        if self.method:
            parts.append(f"method={self.method}")
        if self.path:
            parts.append(f"path={self.path}")
        if self.host:
            parts.append(f"host={self.host}")
        for h in self.headers:
            shown = h.name if h.value is None else f"{h.name}: {h.value}"
            parts.append(f"header[{shown}]" + (f"({h.mismatch})" if h.mismatch else ""))
        return "{" + " ".join(parts) + "}" if parts else "{any}"


@dataclass(frozen=True, slots=True)
class KafkaRule:
    api_keys: tuple[int, ...] = ()  # empty = any
    api_version: int | None = None
    client_id: str = ""
    topic: str = ""
    text: str = ""  # what the user wrote, for traces

    def __str__(self) -> str:
        return self.text or "{any}"


@dataclass(frozen=True, slots=True)
class L7Rules:
    parser: str  # "http", "kafka" or "dns"
    http: tuple[HttpRule, ...] = ()
    kafka: tuple[KafkaRule, ...] = ()
    dns: tuple[FQDNSelector, ...] = ()

    @property
    def rules(self) -> tuple:
        return getattr(self, self.parser)


@dataclass(frozen=True, slots=True)
class PortRule:
    ports: tuple[PortProto, ...]  # empty = all ports, any protocol
    l7: L7Rules | None = None


@dataclass(frozen=True, slots=True)
class ICMPField:
    family: str  # IPv4 / IPv6
    type: int


@dataclass(frozen=True, slots=True)
class PeerRule:
    """One entry of ingress/egress/ingressDeny/egressDeny."""

    peers: Peers
    ports: tuple[PortRule, ...] = ()  # empty = all ports (L3 only)
    icmps: tuple[ICMPField, ...] = ()
    requires: tuple[Selector, ...] = ()  # fromRequires / toRequires
    line: int = field(default=0, compare=False)  # moving a rule in its file changes nothing
    path: str = field(default="", compare=False)  # e.g. "spec.ingress[1]", for diagnostics


@dataclass(frozen=True, slots=True)
class Rule:
    """One Cilium rule (one `spec` / `specs` item, or a translated NetworkPolicy)."""

    name: str
    namespace: str  # "" for clusterwide
    kind: str
    selector: Selector | None  # endpointSelector (None when the rule uses nodeSelector)
    node_selector: Selector | None = None
    ingress: tuple[PeerRule, ...] = ()
    ingress_deny: tuple[PeerRule, ...] = ()
    egress: tuple[PeerRule, ...] = ()
    egress_deny: tuple[PeerRule, ...] = ()
    has_ingress: bool = False  # the section is present (even empty), enables default deny
    has_egress: bool = False
    default_deny_ingress: bool = True
    default_deny_egress: bool = True
    description: str = ""
    labels: tuple[str, ...] = ()
    file: str = ""
    line: int = field(default=0, compare=False)
    index: int = 0  # position among the specs of one document
    extra: dict = field(default_factory=dict, compare=False, hash=False)
    _hash: int = field(default=0, compare=False, repr=False, init=False)
    ident: str = field(default="", compare=False, init=False)  # "namespace/name[index]"

    def __post_init__(self) -> None:
        # Rules are compared and hashed a lot when recompiling (cache keys); hash once.
        object.__setattr__(self, "_hash", hash(_fields_of(self)))
        ns = f"{self.namespace}/" if self.namespace else ""
        suffix = f"[{self.index}]" if self.index else ""
        object.__setattr__(self, "ident", f"{ns}{self.name}{suffix}")

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Rule):
            return NotImplemented
        return self._hash == other._hash and _fields_of(self) == _fields_of(other)

    def sections(self, direction: int) -> tuple[tuple[PeerRule, ...], tuple[PeerRule, ...]]:
        if direction == INGRESS:
            return self.ingress, self.ingress_deny
        return self.egress, self.egress_deny


def _fields_of(rule: Rule) -> tuple:
    return tuple(getattr(rule, f.name) for f in fields(rule) if f.compare)
