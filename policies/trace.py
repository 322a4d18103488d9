"""`policy trace`: would this flow pass? Pure: rules and labels in, an explained verdict out.

The verdict itself comes from the compiled MapState and L7 rule sets (the same objects the
datapath and the proxy use); the explanation walks the rules to say why each one matched or not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from policies import identity as ids
from policies.compile import ALL_PORTS, compile_policy, port_keys
from policies.compiled import CompiledPolicy, l4_verdict
from policies.kafka_keys import api_key_name
from policies.labels import NAMESPACE_KEY, Label, LabelSet, parse_labels
from policies.model import EGRESS, INGRESS, PROTO_NAMES, PROTO_NUMBERS, PortProto, Rule
from policies.selection import named_port_numbers, selects
from policies.selectors import Universe


class TraceInputError(ValueError):
    """Bad trace input (labels, port, API key...): the CLI exits 2."""


@dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    host: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)
class KafkaRequest:
    api_key: int
    api_version: int = 0
    topics: tuple[str, ...] = ()
    client_id: str | None = None


@dataclass(slots=True)
class Peer:
    labels: LabelSet
    ip: str | None
    kind: str  # "endpoint" | "world" | "host" | "reserved"

    @property
    def managed(self) -> bool:
        return self.kind in ("endpoint", "host")


@dataclass(slots=True)
class TraceResult:
    verdict: str
    egress: dict
    ingress: dict
    l7: dict | None
    log: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "verdict": self.verdict,
            "egress": self.egress,
            "ingress": self.ingress,
            "l7": self.l7,
            "log": self.log,
        }


def parse_peer(text: str, ip: str | None) -> Peer:
    try:
        labels = parse_labels(text)
    except ValueError as exc:
        raise TraceInputError(f"bad labels {text!r}: {exc}") from None
    if not len(labels):
        raise TraceInputError(f"no labels in {text!r}")
    reserved = [lab for lab in labels if lab.source == "reserved"]
    if reserved:
        name = reserved[0].key
        if name not in ids.RESERVED_BY_NAME:
            raise TraceInputError(f"unknown reserved label reserved:{name}")
        if name in ("world", "world-ipv4", "world-ipv6"):
            return Peer(labels, ip, "world")
        if name == "host":
            return Peer(labels, ip, "host")
        if name in ("ingress", "init", "health"):
            # local endpoints with reserved identities: policies select them by these labels
            return Peer(labels, ip, "endpoint")
        return Peer(labels, ip, "reserved")
    if labels.namespace() is None:
        labels = labels.with_labels([Label("k8s", NAMESPACE_KEY, "default")])
    return Peer(labels, ip, "endpoint")


def parse_port(text: str) -> tuple[int, int]:
    port_text, _, proto_text = str(text).partition("/")
    proto_text = (proto_text or "TCP").upper()
    if proto_text in ("ICMP", "ICMPV6"):
        proto = 1 if proto_text == "ICMP" else 58
    elif proto_text in PROTO_NUMBERS and proto_text != "ANY":
        proto = PROTO_NUMBERS[proto_text]
    else:
        raise TraceInputError(f"bad protocol {proto_text!r}: TCP, UDP, SCTP, ICMP or ICMPv6")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise TraceInputError(f"bad port {port_text!r}: 0-65535")
    return int(port_text), proto


class _Tracer:
    def __init__(
        self,
        rules: list[Rule],
        src: Peer,
        dst: Peer,
        port: int,
        proto: int,
        named_ports=None,
        learned=None,
    ):
        self.rules = rules
        # {"src"|"dst": {port name: number}}: what `toPorts: [{port: NAME}]` resolves to, as in
        # compile_policy (ingress: the destination's own names; egress: any endpoint's).
        self.named_ports = named_ports or {}
        self.src, self.dst = src, dst
        self.port, self.proto = port, proto
        self.log: list[str] = []
        self.allocator = ids.IdentityAllocator()
        self.ipcache = ids.IPCache()
        endpoints = {}
        if src.managed:
            endpoints["src"] = src.labels
        if dst.managed:
            endpoints["dst"] = dst.labels
        self.compiled: CompiledPolicy = compile_policy(
            rules, endpoints, self.allocator, self.ipcache, revision=1,
            named_ports={k: v for k, v in self.named_ports.items() if k in endpoints},
            learned=learned,
        )  # fmt: skip
        self.universe = Universe(self.allocator.identities())
        self.src_id = self._identity(src)
        self.dst_id = self._identity(dst)

    def _identity(self, peer: Peer) -> int:
        if peer.kind == "world":
            if peer.ip:
                return self.ipcache.lookup(peer.ip)
            return ids.RESERVED_BY_NAME[next(iter(peer.labels)).key]
        if peer.kind in ("host", "reserved"):
            return ids.RESERVED_BY_NAME[
                next(lab for lab in peer.labels if lab.source == "reserved").key
            ]
        return self.allocator.allocate(peer.labels)

    def describe_id(self, number: int) -> str:
        labels = self.allocator.labels_of(number)
        return f"identity {number} ({labels})" if labels is not None else f"identity {number}"

    def side(self, direction: int) -> tuple[dict, int]:
        """One direction's verdict and explanation; returns (section, l7_id or 0)."""
        name = "egress" if direction == EGRESS else "ingress"
        subject, subject_key, peer_id = (
            (self.src, "src", self.dst_id)
            if direction == EGRESS
            else (self.dst, "dst", self.src_id)
        )
        who = "source" if direction == EGRESS else "destination"
        if not subject.managed:
            self.log.append(
                f"{name}: the {who} ({subject.labels}) is not a managed endpoint: no {name} policy applies"
            )
            return {
                "verdict": "ALLOWED",
                "enforced": False,
                "rules": [],
                "reason": f"the {who} is outside the cluster's policy",
            }, 0
        ep = self.compiled.endpoints[subject_key]
        enforced = ep.ingress_enforced if direction == INGRESS else ep.egress_enforced
        self.log.append(
            f"{name}: {who} {self.describe_id(ep.identity)}; peer {self.describe_id(peer_id)}; "
            f"{'default-deny' if enforced else 'not enforced (default-allow)'}"
        )
        explained = []
        others = []
        for rule in self.rules:
            if not selects(rule, subject.labels):
                others.append(rule)
                continue
            explained.append(self._explain_rule(rule, direction, peer_id))
        if not explained:
            self.log.append(f"  no rule selects the {who}")
        if others:
            shown = ", ".join(f"{r.ident} {r.selector or r.node_selector}" for r in others[:5])
            more = f" and {len(others) - 5} more" if len(others) > 5 else ""
            self.log.append(f"  rules that do not select the {who}: {shown}{more}")
        v = l4_verdict(self.compiled, subject_key, peer_id, direction, self.proto, self.port)
        verdict = "DENIED" if v.action == "deny" else "ALLOWED"
        self.log.append(f"  => {name} {verdict}: {v.reason}")
        section = {
            "verdict": verdict,
            "enforced": enforced,
            "action": v.action,
            "reason": v.reason,
            "identity": ep.identity,
            "peer_identity": peer_id,
            "rules": explained,
        }
        if v.action == "redirect":
            section["l7_id"] = v.l7_id
        return section, v.l7_id

    def _explain_rule(self, rule: Rule, direction: int, peer_id: int) -> dict:
        allow, deny = rule.sections(direction)
        dname = "ingress" if direction == INGRESS else "egress"
        out = {"rule": rule.ident, "file": rule.file, "line": rule.line, "entries": []}
        self.log.append(f"  rule {rule.ident} ({rule.file}:{rule.line}) selects it")
        if not allow and not deny:
            self.log.append(f"    has no {dname} section")
        requires = tuple(r for pr in (*allow, *deny) for r in pr.requires)
        for section_name, section in ((dname, allow), (f"{dname}Deny", deny)):
            for i, pr in enumerate(section):
                peers = self.universe.resolve(pr.peers, requires if section is allow else ())
                l3 = 0 in peers or peer_id in peers
                described = pr.peers.describe()
                if l3:
                    l3_why = f"peer matches {described}"
                elif described.startswith("no peer"):
                    l3_why = f"the rule selects {described}"
                else:
                    l3_why = f"peer is not selected by {described}"
                l4, l4_why, l7 = self._l4(pr, direction)
                entry = {
                    "section": f"{section_name}[{i}]",
                    "line": pr.line,
                    "l3": l3,
                    "l3_reason": l3_why,
                    "l4": l4,
                    "l4_reason": l4_why,
                    "matched": l3 and l4,
                    "deny": section is deny,
                }
                if l7 is not None:
                    entry["l7"] = l7
                out["entries"].append(entry)
                mark = "MATCH" if l3 and l4 else "no match"
                kind = "deny" if section is deny else "allow"
                self.log.append(
                    f"    {section_name}[{i}] (line {pr.line}, {kind}): {mark}: L3 {l3_why}; L4 {l4_why}"
                    + (f"; L7 {l7['parser']} rules {l7['rules']}" if l7 and l3 and l4 else "")
                )
        return out

    def _named(self, pp: PortProto, direction: int) -> list[PortProto]:
        """A named port as the numbers it resolves to (compile_policy's rule), else itself."""
        if not pp.name:
            return [pp]
        own = "dst" if direction == INGRESS else "src"
        numbers = named_port_numbers(self.named_ports, pp.name, direction, own)
        return [PortProto(n, n, pp.proto) for n in numbers]

    def _port_matches(self, pp: PortProto) -> bool:
        for proto, port, plen in port_keys(pp):
            shift = 16 - plen
            if proto in (0, self.proto) and (self.port >> shift) == (port >> shift):
                return True
        return False

    def _l4(self, pr, direction: int) -> tuple[bool, str, dict | None]:
        want = f"{self.port}/{PROTO_NAMES.get(self.proto, self.proto)}"
        if pr.icmps:
            types = [f.type for f in pr.icmps]
            ok = self.proto in (1, 58) and self.port in types
            return ok, f"{want} {'is' if ok else 'is not'} among ICMP types {types}", None
        if not pr.ports:
            return True, "all ports", None
        for port_rule in pr.ports:
            for given in port_rule.ports or (ALL_PORTS,):
                for pp in self._named(given, direction):
                    if not self._port_matches(pp):
                        continue
                    l7 = None
                    if port_rule.l7 is not None:
                        l7 = {
                            "parser": port_rule.l7.parser,
                            "rules": [str(r) for r in port_rule.l7.rules],
                        }
                    shown = f"{given} (= {pp.port})" if given.name else str(pp)
                    return True, f"{want} matches port {shown}", l7
        shown = ", ".join(
            str(pp) for port_rule in pr.ports for pp in port_rule.ports or (ALL_PORTS,)
        )
        return False, f"{want} is not in {shown}", None


def trace(
    rules: list[Rule],
    src: Peer,
    dst: Peer,
    port: int,
    proto: int,
    http: HttpRequest | None = None,
    kafka: KafkaRequest | None = None,
    named_ports: Mapping[str, Mapping[str, int]] | None = None,
    dns: str | None = None,
    fqdn: str | None = None,
) -> TraceResult:
    """`named_ports`: {"src"|"dst": {name: number}}, the endpoints' named ports (the agent's
    `endpoint create --port`), so rules on a named port resolve as in the agent's compile.
    `dns`: a DNS query name, judged by the DNS rule set of the port (if the port has one).
    `fqdn`: the destination IP was returned by DNS for this name (toFQDNs resolve it)."""
    learned = {fqdn: [dst.ip]} if fqdn and dst.ip else None
    if fqdn and not dst.ip:
        raise TraceInputError("--fqdn needs the destination's IP (--dst-ip)")
    t = _Tracer(rules, src, dst, port, proto, named_ports, learned)
    if fqdn:
        t.log.append(f"learned: {dst.ip} was returned by DNS for {fqdn}")
    t.log.append(
        f"flow: {src.labels}{f' [{src.ip}]' if src.ip else ''} -> {dst.labels}"
        f"{f' [{dst.ip}]' if dst.ip else ''} port {port}/{PROTO_NAMES.get(proto, proto)}"
    )
    for diag in t.compiled.diagnostics:
        t.log.append(f"note: {diag}")
    egress, egress_l7 = t.side(EGRESS)
    ingress, ingress_l7 = t.side(INGRESS)
    l3l4_ok = egress["verdict"] == "ALLOWED" and ingress["verdict"] == "ALLOWED"
    l7 = None
    verdict = "ALLOWED" if l3l4_ok else "DENIED"
    redirects = [(n, i) for n, i in (("egress", egress_l7), ("ingress", ingress_l7)) if i]
    request = http is not None or kafka is not None or dns is not None
    if redirects and l3l4_ok:
        l7 = _l7_section(t, redirects, http, kafka, dns)
        if l7["verdict"] == "DENIED":
            verdict = "DENIED"
    elif request and l3l4_ok:
        t.log.append("l7: no L7 rules apply to this port: the request is not inspected")
    elif request:
        t.log.append("l7: the connection is dropped at L3/L4 before any request is seen")
    t.log.append(f"verdict: {verdict}")
    return TraceResult(verdict, egress, ingress, l7, t.log)


def _request_for(rs, http, kafka, dns=None) -> tuple[tuple, str] | None:
    """The check arguments and the log label of the request this rule set's parser reads."""
    if rs.parser == "dns" and dns is not None:
        return (dns,), f"DNS query {dns}"
    if rs.parser == "http" and http is not None:
        return (http.method, http.path, http.host, http.headers), f"HTTP {http.method} {http.path}"
    if rs.parser == "kafka" and kafka is not None:
        args = (kafka.api_key, kafka.api_version, kafka.client_id, kafka.topics)
        label = (
            f"Kafka {api_key_name(kafka.api_key)} v{kafka.api_version} topics {list(kafka.topics)}"
        )
        return args, label
    return None


def _check_request(t: _Tracer, side: str, rs, args: tuple, label: str, info: dict, matched) -> bool:
    """Check one request against one rule set, log why each rule matched or not; True if allowed."""
    v = rs.check(*args)
    for i, ok, why in rs.explain(*args):
        shown = str(rs.rules[i]) if i >= 0 else "allow-all"
        t.log.append(f"  {'MATCH' if ok else 'no match'} {shown}: {why}")
    for i in v.matched:
        matched.append({"side": side, "rule": str(rs.rules[i]), "source": rs.sources[i]})
    if rs.allow_all and v.allowed and not v.matched:
        matched.append({"side": side, "rule": "allow-all", "source": ""})
    if getattr(v, "header_actions", None):
        info["header_actions"] = [list(a) for a in v.header_actions]
    if getattr(v, "denied_topics", None):
        info["denied_topics"] = list(v.denied_topics)
    info["allowed"] = v.allowed
    t.log.append(f"  => {label} {'ALLOWED' if v.allowed else 'DENIED'}")
    return v.allowed


def _l7_section(t: _Tracer, redirects, http, kafka, dns=None) -> dict:
    sets = []
    matched: list[dict] = []
    verdict = "ALLOWED"
    request_given = False
    for side, l7_id in redirects:
        rs = t.compiled.l7[l7_id]
        info = {"side": side, "l7_id": l7_id, "parser": rs.parser, "rules": rs.describe()}
        sets.append(info)
        t.log.append(
            f"l7 ({side}): redirected to the proxy, {rs.parser} rules: {'; '.join(rs.describe())}"
        )
        request = _request_for(rs, http, kafka, dns)
        if request is not None:
            request_given = True
            if not _check_request(t, side, rs, *request, info, matched):
                verdict = "DENIED"
        elif http is not None or kafka is not None or dns is not None:
            request_given = True
            verdict = "DENIED"
            info["allowed"] = False
            t.log.append(f"  => the request is not {rs.parser}: the {rs.parser} parser rejects it")
    rules = [r for s in sets for r in s["rules"]]
    if not request_given:
        t.log.append(
            "l7: no L7 request given: the flow would be redirected to the proxy; the L3/L4 verdict stands"
        )
        return {
            "verdict": "REDIRECTED",
            "redirect": True,
            "matched": [],
            "rules": rules,
            "rule_sets": sets,
        }
    return {
        "verdict": verdict,
        "redirect": True,
        "matched": matched,
        "rules": rules,
        "rule_sets": sets,
    }
