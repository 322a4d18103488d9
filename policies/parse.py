"""Turn policy documents (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy)
into `Rule`s, collecting `FILE:LINE: FIELD: reason` diagnostics on the way.

Unsupported fields are never dropped silently: each one gets a named diagnostic. When the rest of
the file can still be enforced fail-closed (the unsupported part only ever *adds* allowed traffic),
the diagnostic is a warning that says what is not enforced; otherwise it is an error.
"""

from __future__ import annotations

import ipaddress
import re

import re2

from policies import icmp, kafka_keys
from policies.diagnostics import ERROR, WARNING, Diagnostic
from policies.labels import (
    DEFAULT_NAMESPACE,
    NAMESPACE_KEY,
    NAMESPACE_LABEL_PREFIX,
    Requirement,
    Selector,
    split_source,
)
from policies.model import (
    ENTITIES,
    PROTO_ANY,
    PROTO_NUMBERS,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    CIDRRule,
    HeaderMatch,
    HttpRule,
    ICMPField,
    KafkaRule,
    L7Rules,
    PeerRule,
    Peers,
    PortProto,
    PortRule,
    Rule,
)
from policies.yamlsrc import LDict, LList

CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
KNP = "NetworkPolicy"
KINDS = {CNP: "cilium.io/v2", CCNP: "cilium.io/v2", KNP: "networking.k8s.io/v1"}

RULE_KEYS = {
    "endpointSelector",
    "nodeSelector",
    "ingress",
    "ingressDeny",
    "egress",
    "egressDeny",
    "labels",
    "description",
    "enableDefaultDeny",
    "log",
}
PEER_KEYS_IN = {"fromEndpoints", "fromCIDR", "fromCIDRSet", "fromEntities", "fromNodes"}
PEER_KEYS_OUT = {"toEndpoints", "toCIDR", "toCIDRSet", "toEntities", "toNodes"}
HTTP_KEYS = {"method", "path", "host", "headers", "headerMatches"}
KAFKA_KEYS = {"role", "apiKey", "apiVersion", "clientID", "topic"}
MISMATCH_ACTIONS = {"", "LOG", "ADD", "DELETE", "REPLACE"}
NAMED_PORT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
_QUIET = re2.Options()
_QUIET.log_errors = False
KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,255}$")


class _Ctx:
    """Where we are (file, kind, namespace) and the diagnostics collected so far."""

    def __init__(self, file: str, diagnostics: list[Diagnostic]):
        self.file = file
        self.diagnostics = diagnostics
        self.namespace = ""
        self.clusterwide = False
        self.errors_before = 0

    def error(self, line: int, field: str, reason: str) -> None:
        self.diagnostics.append(Diagnostic(self.file, line, field, reason, ERROR))

    def warn(self, line: int, field: str, reason: str) -> None:
        self.diagnostics.append(Diagnostic(self.file, line, field, reason, WARNING))

    def error_count(self) -> int:
        return sum(1 for d in self.diagnostics if d.severity == ERROR)


def _ln(node, key=None, default: int = 1) -> int:
    if key is not None and isinstance(node, (LDict, LList)):
        return node.line_of(key)
    return getattr(node, "line", default) or default


def _as_list(ctx: _Ctx, node, field: str, line: int) -> list:
    if node is None:
        return []
    if not isinstance(node, list):
        ctx.error(line, field, f"must be a list, got {type(node).__name__}")
        return []
    return node


def _as_dict(ctx: _Ctx, node, field: str, line: int) -> dict | None:
    if node is None:
        return {}
    if not isinstance(node, dict):
        ctx.error(line, field, f"must be a mapping, got {type(node).__name__}")
        return None
    return node


# ---------------------------------------------------------------------------------------------
# Documents


def parse_document(doc, line: int, ctx: _Ctx) -> list[Rule]:
    if not isinstance(doc, dict):
        ctx.error(line, "document", "must be a mapping with apiVersion and kind")
        return []
    kind = doc.get("kind")
    if kind == "List" or (kind is None and isinstance(doc.get("items"), list)):
        rules: list[Rule] = []
        items = _as_list(ctx, doc.get("items"), "items", _ln(doc, "items", line))
        for i, item in enumerate(items):
            rules.extend(parse_document(item, _ln(items, i, line), ctx))
        return rules
    if kind not in KINDS:
        ctx.error(
            _ln(doc, "kind", line),
            "kind",
            f"unsupported kind {kind!r}; expected one of {', '.join(KINDS)}",
        )
        return []
    api = doc.get("apiVersion")
    if api != KINDS[kind]:
        ctx.error(
            _ln(doc, "apiVersion", line),
            "apiVersion",
            f"{kind} needs apiVersion {KINDS[kind]!r}, got {api!r}",
        )
        return []
    meta = _as_dict(ctx, doc.get("metadata"), "metadata", _ln(doc, "metadata", line)) or {}
    name = meta.get("name")
    if not name:
        ctx.error(_ln(doc, "metadata", line), "metadata.name", "is required")
        name = "<unnamed>"
    name = str(name)
    if kind == CCNP:
        if meta.get("namespace"):
            ctx.warn(
                _ln(meta, "namespace", line),
                "metadata.namespace",
                "ignored: a clusterwide policy is not namespaced",
            )
        ctx.namespace, ctx.clusterwide = "", True
    else:
        ctx.namespace = str(meta.get("namespace") or DEFAULT_NAMESPACE)
        ctx.clusterwide = False
    if kind == KNP:
        return _parse_knp(doc, name, line, ctx)

    rules = []
    specs: list[tuple[object, str, int]] = []
    if "spec" in doc:
        specs.append((doc["spec"], "spec", _ln(doc, "spec", line)))
    if "specs" in doc:
        items = _as_list(ctx, doc["specs"], "specs", _ln(doc, "specs", line))
        specs.extend((s, f"specs[{i}]", _ln(items, i, line)) for i, s in enumerate(items))
    if not specs:
        ctx.error(line, "spec", f"{kind} needs spec or specs")
    for index, (spec, field, spec_line) in enumerate(specs):
        rule = _parse_spec(spec, field, spec_line, name, kind, index, ctx)
        if rule is not None:
            rules.append(rule)
    return rules


# ---------------------------------------------------------------------------------------------
# Selectors


def _parse_selector(node, field: str, line: int, ctx: _Ctx) -> Selector | None:
    node = _as_dict(ctx, node, field, line)
    if node is None:
        return None
    reqs: list[Requirement] = []
    for key in node:
        if key not in ("matchLabels", "matchExpressions"):
            ctx.error(_ln(node, key, line), f"{field}.{key}", "unknown selector field")
    labels = _as_dict(
        ctx, node.get("matchLabels"), f"{field}.matchLabels", _ln(node, "matchLabels", line)
    )
    for key, value in (labels or {}).items():
        source, k = split_source(str(key))
        reqs.append(Requirement(source, k, "In", ("" if value is None else str(value),)))
    exprs = _as_list(
        ctx,
        node.get("matchExpressions"),
        f"{field}.matchExpressions",
        _ln(node, "matchExpressions", line),
    )
    for i, expr in enumerate(exprs):
        efield = f"{field}.matchExpressions[{i}]"
        eline = _ln(exprs, i, line)
        if not isinstance(expr, dict) or "key" not in expr or "operator" not in expr:
            ctx.error(eline, efield, "needs key and operator")
            continue
        op_text = str(expr["operator"])
        op = {"in": "In", "notin": "NotIn", "exists": "Exists", "doesnotexist": "DoesNotExist"}.get(
            op_text.lower()
        )
        if op is None:
            ctx.error(
                _ln(expr, "operator", eline),
                f"{efield}.operator",
                f"unknown operator {op_text!r}; expected In, NotIn, Exists or DoesNotExist",
            )
            continue
        values = _as_list(ctx, expr.get("values"), f"{efield}.values", _ln(expr, "values", eline))
        if op in ("In", "NotIn") and not values:
            ctx.error(_ln(expr, "operator", eline), f"{efield}.values", f"{op} needs values")
            continue
        if op in ("Exists", "DoesNotExist") and values:
            ctx.error(_ln(expr, "values", eline), f"{efield}.values", f"{op} must not have values")
            continue
        source, k = split_source(str(expr["key"]))
        reqs.append(Requirement(source, k, op, tuple(str(v) for v in values)))
    return Selector(tuple(reqs))


def _is_reserved(sel: Selector) -> bool:
    return sel.has_source("reserved")


def _scope_subject(sel: Selector, ctx: _Ctx) -> Selector:
    """The endpointSelector of a namespaced policy only selects inside its namespace."""
    if ctx.clusterwide or _is_reserved(sel):
        return sel
    return sel.with_requirement(Requirement("k8s", NAMESPACE_KEY, "In", (ctx.namespace,)))


def _scope_peer(sel: Selector, ctx: _Ctx) -> Selector:
    """Peers without an explicit namespace are in the policy's namespace (any namespace that is a
    Kubernetes namespace for a clusterwide policy), as Cilium's k8s translation does."""
    if _is_reserved(sel) or sel.has_key(NAMESPACE_KEY):
        return sel
    if ctx.clusterwide:
        return sel.with_requirement(Requirement("k8s", NAMESPACE_KEY, "Exists"))
    return sel.with_requirement(Requirement("k8s", NAMESPACE_KEY, "In", (ctx.namespace,)))


# ---------------------------------------------------------------------------------------------
# Rules


def _parse_spec(spec, field, line, name, kind, index, ctx: _Ctx) -> Rule | None:
    spec = _as_dict(ctx, spec, field, line)
    if spec is None:
        return None
    for key in spec:
        if key not in RULE_KEYS:
            ctx.error(_ln(spec, key, line), f"{field}.{key}", "unknown field")
    selector = node_selector = None
    if "endpointSelector" in spec and "nodeSelector" in spec:
        ctx.error(
            _ln(spec, "nodeSelector", line),
            f"{field}.nodeSelector",
            "endpointSelector and nodeSelector are mutually exclusive",
        )
    if "endpointSelector" in spec:
        sel = _parse_selector(
            spec["endpointSelector"],
            f"{field}.endpointSelector",
            _ln(spec, "endpointSelector", line),
            ctx,
        )
        selector = _scope_subject(sel, ctx) if sel is not None else None
    elif "nodeSelector" in spec:
        if not ctx.clusterwide:
            ctx.error(
                _ln(spec, "nodeSelector", line),
                f"{field}.nodeSelector",
                "only a CiliumClusterwideNetworkPolicy may select nodes",
            )
        node_selector = _parse_selector(
            spec["nodeSelector"], f"{field}.nodeSelector", _ln(spec, "nodeSelector", line), ctx
        )
    else:
        ctx.error(
            line, f"{field}.endpointSelector", "one of endpointSelector or nodeSelector is required"
        )
    if selector is None and node_selector is None:
        return None

    sections = {}
    for key, direction, deny in (
        ("ingress", "in", False),
        ("ingressDeny", "in", True),
        ("egress", "out", False),
        ("egressDeny", "out", True),
    ):
        items = _as_list(ctx, spec.get(key), f"{field}.{key}", _ln(spec, key, line))
        sections[key] = tuple(
            pr
            for i, item in enumerate(items)
            if (
                pr := _parse_peer_rule(
                    item, f"{field}.{key}[{i}]", _ln(items, i, line), direction, deny, ctx
                )
            )
            is not None
        )

    dd_in = dd_out = True
    dd = spec.get("enableDefaultDeny")
    if dd is not None:
        dd_node = _as_dict(
            ctx, dd, f"{field}.enableDefaultDeny", _ln(spec, "enableDefaultDeny", line)
        )
        for k, v in (dd_node or {}).items():
            kline = _ln(dd_node, k, line)
            if k not in ("ingress", "egress"):
                ctx.error(kline, f"{field}.enableDefaultDeny.{k}", "unknown field")
            elif not isinstance(v, bool):
                ctx.error(kline, f"{field}.enableDefaultDeny.{k}", "must be true or false")
            elif k == "ingress":
                dd_in = v
            else:
                dd_out = v

    labels = []
    for i, lab in enumerate(
        _as_list(ctx, spec.get("labels"), f"{field}.labels", _ln(spec, "labels", line))
    ):
        if isinstance(lab, dict) and "key" in lab:
            src = lab.get("source") or "unspec"
            labels.append(f"{src}:{lab['key']}={lab.get('value', '')}")
        else:
            ctx.error(
                _ln(spec, "labels", line), f"{field}.labels[{i}]", "needs key (and value, source)"
            )
    description = spec.get("description") or ""
    if not isinstance(description, str):
        ctx.error(_ln(spec, "description", line), f"{field}.description", "must be a string")
        description = str(description)

    return Rule(
        name=name,
        namespace=ctx.namespace,
        kind=kind,
        selector=selector,
        node_selector=node_selector,
        ingress=sections["ingress"],
        ingress_deny=sections["ingressDeny"],
        egress=sections["egress"],
        egress_deny=sections["egressDeny"],
        has_ingress=bool(spec.get("ingress")) or bool(spec.get("ingressDeny")),
        has_egress=bool(spec.get("egress")) or bool(spec.get("egressDeny")),
        default_deny_ingress=dd_in,
        default_deny_egress=dd_out,
        description=description,
        labels=tuple(labels),
        file=ctx.file,
        line=line,
        index=index,
    )


def _parse_peer_rule(item, field, line, direction, deny, ctx: _Ctx) -> PeerRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    prefix = "from" if direction == "in" else "to"
    peer_keys = PEER_KEYS_IN if direction == "in" else PEER_KEYS_OUT
    known = peer_keys | {f"{prefix}Requires", "toPorts", "icmps", "authentication"}
    if direction == "in":
        known |= {"fromGroups"}
    else:
        known |= {"toFQDNs", "toServices", "toGroups"}
    for key in item:
        if key not in known:
            other = "egress" if direction == "in" else "ingress"
            hint = (
                f" (an {other} field)"
                if key.startswith("to" if direction == "in" else "from")
                else ""
            )
            ctx.error(_ln(item, key, line), f"{field}.{key}", f"unknown field{hint}")

    endpoints: list[Selector] = []
    for i, sel_node in enumerate(
        _as_list(
            ctx,
            item.get(f"{prefix}Endpoints"),
            f"{field}.{prefix}Endpoints",
            _ln(item, f"{prefix}Endpoints", line),
        )
    ):
        sline = _ln(item.get(f"{prefix}Endpoints"), i, line)
        sel = _parse_selector(sel_node, f"{field}.{prefix}Endpoints[{i}]", sline, ctx)
        if sel is not None:
            endpoints.append(_scope_peer(sel, ctx))
    nodes: list[Selector] = []
    for i, sel_node in enumerate(
        _as_list(
            ctx,
            item.get(f"{prefix}Nodes"),
            f"{field}.{prefix}Nodes",
            _ln(item, f"{prefix}Nodes", line),
        )
    ):
        sel = _parse_selector(
            sel_node, f"{field}.{prefix}Nodes[{i}]", _ln(item, f"{prefix}Nodes", line), ctx
        )
        if sel is not None:
            nodes.append(sel)
    cidrs = _parse_cidrs(item, prefix, field, line, ctx)
    entities = []
    ent_node = _as_list(
        ctx,
        item.get(f"{prefix}Entities"),
        f"{field}.{prefix}Entities",
        _ln(item, f"{prefix}Entities", line),
    )
    for i, ent in enumerate(ent_node):
        if ent not in ENTITIES:
            ctx.error(
                _ln(ent_node, i, line),
                f"{field}.{prefix}Entities[{i}]",
                f"unknown entity {ent!r}; expected one of {', '.join(ENTITIES)}",
            )
        else:
            entities.append(ent)

    requires = []
    req_key = f"{prefix}Requires"
    if req_key in item:
        req_node = _as_list(ctx, item[req_key], f"{field}.{req_key}", _ln(item, req_key, line))
        for i, sel_node in enumerate(req_node):
            sel = _parse_selector(sel_node, f"{field}.{req_key}[{i}]", _ln(req_node, i, line), ctx)
            if sel is not None:
                requires.append(sel)
        ctx.warn(
            _ln(item, req_key, line),
            f"{field}.{req_key}",
            f"{req_key} is deprecated in Cilium; enforced by ANDing these selectors into every "
            f"{prefix}Endpoints selector (and every L3-wildcard allow) of the allow rules that "
            "select the same endpoints; not applied to CIDR, entity or node peers",
        )

    unresolved = False
    unsupported_peers = (
        (
            "toFQDNs",
            "DNS-based egress (toFQDNs) is not enforced: traffic to these names is not allowed by this rule",
        ),
        (
            "toServices",
            "toServices is not enforced: traffic to these services is not allowed by this rule",
        ),
        (
            "toGroups",
            "toGroups is not enforced: traffic to these groups is not allowed by this rule",
        ),
        (
            "fromGroups",
            "fromGroups is not enforced: traffic from these groups is not allowed by this rule",
        ),
    )
    for key, reason in unsupported_peers:
        if key in item:
            if deny:
                ctx.error(
                    _ln(item, key, line), f"{field}.{key}", f"{key} is not supported in a deny rule"
                )
            else:
                ctx.warn(_ln(item, key, line), f"{field}.{key}", reason)
            unresolved = True

    has_l3 = bool(endpoints or cidrs or entities or nodes or unresolved)
    for key in peer_keys | {req_key}:
        if key in item and item[key] is not None and not item[key] and key != req_key:
            # `fromEndpoints: []` is present but selects nobody (Cilium: no peer).
            has_l3 = True
    if not has_l3 and not requires and "toPorts" not in item and "icmps" not in item:
        # `- {}`: no L3 and no L4 selects nobody; it only turns on default deny (Cilium).
        has_l3 = True
    peers = Peers(
        endpoints=tuple(endpoints),
        cidrs=tuple(cidrs),
        entities=tuple(entities),
        nodes=tuple(nodes),
        wildcard=not has_l3 and not requires,
        unresolved=unresolved and not (endpoints or cidrs or entities or nodes),
    )
    if requires and not has_l3:
        # A rule with only fromRequires allows nothing by itself (it only constrains others).
        peers = Peers(unresolved=True)

    if "authentication" in item:
        ctx.warn(
            _ln(item, "authentication", line),
            f"{field}.authentication",
            "mutual authentication is not enforced: this rule is dropped, so the traffic it would "
            "allow is not allowed" + (" (deny rule kept)" if deny else ""),
        )
        if not deny:
            peers = Peers(unresolved=True)

    ports = _parse_to_ports(item, field, line, deny, ctx)
    icmps = _parse_icmps(item, field, line, ctx)
    if icmps and "toPorts" in item:
        ctx.error(
            _ln(item, "icmps", line),
            f"{field}.icmps",
            "icmps and toPorts cannot be combined in one rule",
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


def _parse_cidrs(item, prefix, field, line, ctx: _Ctx) -> list[CIDRRule]:
    out = []
    key = f"{prefix}CIDR"
    node = _as_list(ctx, item.get(key), f"{field}.{key}", _ln(item, key, line))
    for i, text in enumerate(node):
        net = _network(text, f"{field}.{key}[{i}]", _ln(node, i, line), ctx)
        if net is not None:
            out.append(CIDRRule(net))
    key = f"{prefix}CIDRSet"
    node = _as_list(ctx, item.get(key), f"{field}.{key}", _ln(item, key, line))
    for i, entry in enumerate(node):
        efield, eline = f"{field}.{key}[{i}]", _ln(node, i, line)
        if not isinstance(entry, dict):
            ctx.error(eline, efield, "must be a mapping with cidr (and except)")
            continue
        if "cidr" not in entry:
            for other in ("cidrGroupRef", "cidrGroupSelector"):
                if other in entry:
                    ctx.warn(
                        _ln(entry, other, eline),
                        f"{efield}.{other}",
                        f"{other} is not enforced: CiliumCIDRGroup objects are not loaded, so "
                        "this entry allows nothing",
                    )
                    break
            else:
                ctx.error(eline, f"{efield}.cidr", "is required")
            continue
        net = _network(entry["cidr"], f"{efield}.cidr", _ln(entry, "cidr", eline), ctx)
        if net is None:
            continue
        excepts = []
        ex_node = _as_list(
            ctx, entry.get("except"), f"{efield}.except", _ln(entry, "except", eline)
        )
        for j, ex in enumerate(ex_node):
            exnet = _network(ex, f"{efield}.except[{j}]", _ln(ex_node, j, eline), ctx)
            if exnet is None:
                continue
            if exnet.version != net.version or not exnet.subnet_of(net):
                ctx.error(
                    _ln(ex_node, j, eline), f"{efield}.except[{j}]", f"{exnet} is not inside {net}"
                )
                continue
            excepts.append(exnet)
        out.append(CIDRRule(net, tuple(excepts)))
    return out


def _network(text, field, line, ctx: _Ctx):
    try:
        if "/" not in str(text):
            addr = ipaddress.ip_address(str(text))
            return ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")
        return ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        ctx.error(line, field, f"invalid CIDR {text!r}")
        return None


def _parse_port(entry, field, line, ctx: _Ctx) -> PortProto | None:
    if not isinstance(entry, dict):
        ctx.error(line, field, "must be a mapping with port and protocol")
        return None
    for key in entry:
        if key not in ("port", "endPort", "protocol"):
            ctx.error(_ln(entry, key, line), f"{field}.{key}", "unknown field")
    proto_text = str(entry.get("protocol") or "ANY").upper()
    if proto_text not in PROTO_NUMBERS:
        ctx.error(
            _ln(entry, "protocol", line),
            f"{field}.protocol",
            f"unknown protocol {entry.get('protocol')!r}; expected TCP, UDP, SCTP or ANY",
        )
        return None
    proto = PROTO_NUMBERS[proto_text]
    raw = entry.get("port", "0")
    text = str(raw if raw is not None else "0").strip()
    name = ""
    if text.isdigit():
        port = int(text)
        if port > 65535:
            ctx.error(
                _ln(entry, "port", line), f"{field}.port", f"port {port} is out of range 0-65535"
            )
            return None
    elif NAMED_PORT.match(text) and any(c.isalpha() for c in text):
        port, name = 0, text
    else:
        ctx.error(
            _ln(entry, "port", line),
            f"{field}.port",
            f"invalid port {raw!r}: a number 0-65535 or a port name",
        )
        return None
    end = entry.get("endPort")
    end_port = port
    if end is not None:
        if not isinstance(end, int) or isinstance(end, bool) or not 0 <= end <= 65535:
            ctx.error(_ln(entry, "endPort", line), f"{field}.endPort", f"invalid endPort {end!r}")
            return None
        if name:
            ctx.error(
                _ln(entry, "endPort", line),
                f"{field}.endPort",
                "endPort cannot be used with a named port",
            )
            return None
        if port == 0:
            ctx.error(
                _ln(entry, "endPort", line), f"{field}.endPort", "endPort needs a non-zero port"
            )
            return None
        if end < port:
            ctx.error(
                _ln(entry, "endPort", line),
                f"{field}.endPort",
                f"endPort {end} is below port {port}",
            )
            return None
        end_port = end
    return PortProto(port, end_port if port else 0, proto, name)


def _parse_to_ports(item, field, line, deny, ctx: _Ctx) -> tuple[PortRule, ...] | None:
    """The toPorts list. Returns None when every entry had to be dropped fail-closed."""
    if "toPorts" not in item:
        return ()
    node = _as_list(ctx, item["toPorts"], f"{field}.toPorts", _ln(item, "toPorts", line))
    out = []
    dropped = 0
    for i, entry in enumerate(node):
        pfield, pline = f"{field}.toPorts[{i}]", _ln(node, i, line)
        if not isinstance(entry, dict):
            ctx.error(pline, pfield, "must be a mapping with ports (and rules)")
            continue
        for key in entry:
            if key not in (
                "ports",
                "rules",
                "terminatingTLS",
                "originatingTLS",
                "serverNames",
                "listener",
            ):
                ctx.error(_ln(entry, key, pline), f"{pfield}.{key}", "unknown field")
        ports = []
        plist = _as_list(ctx, entry.get("ports"), f"{pfield}.ports", _ln(entry, "ports", pline))
        for j, p in enumerate(plist):
            pp = _parse_port(p, f"{pfield}.ports[{j}]", _ln(plist, j, pline), ctx)
            if pp is not None:
                ports.append(pp)
        drop = False
        for key, what in (
            ("terminatingTLS", "TLS termination"),
            ("originatingTLS", "TLS origination"),
            ("serverNames", "the TLS server-name (SNI) restriction"),
            ("listener", "the custom Envoy listener"),
        ):
            if key in entry:
                if deny:
                    ctx.error(
                        _ln(entry, key, pline),
                        f"{pfield}.{key}",
                        f"{key} is not allowed in a deny rule",
                    )
                else:
                    ctx.warn(
                        _ln(entry, key, pline),
                        f"{pfield}.{key}",
                        f"{what} is not enforced: this port rule is dropped, so these ports are "
                        "not allowed by it",
                    )
                drop = True
        l7 = None
        if "rules" in entry and entry["rules"] is not None:
            if deny:
                ctx.error(
                    _ln(entry, "rules", pline),
                    f"{pfield}.rules",
                    "L7 rules are not allowed in a deny rule",
                )
            else:
                l7, drop_l7 = _parse_l7(
                    entry["rules"], f"{pfield}.rules", _ln(entry, "rules", pline), ctx
                )
                drop = drop or drop_l7
                if l7 is not None:
                    ports = _l7_ports(ports, l7.parser, pfield, pline, entry, ctx)
                    if ports is None:
                        continue
        if drop:
            dropped += 1
            continue
        out.append(PortRule(tuple(ports), l7))
    if dropped and not out:
        return None
    return tuple(out)


def _l7_ports(ports, parser, field, line, entry, ctx: _Ctx) -> list[PortProto] | None:
    """L7 rules are enforced by a TCP proxy: they need a port, and TCP."""
    pline = _ln(entry, "ports", line)
    if not ports:
        ctx.error(pline, f"{field}.ports", f"{parser} rules need a port")
        return None
    out = []
    for j, pp in enumerate(ports):
        if pp.port == 0 and not pp.name:
            ctx.error(pline, f"{field}.ports[{j}].port", f"{parser} rules need a non-zero port")
            return None
        if pp.proto in (PROTO_UDP, PROTO_SCTP):
            proto = "UDP" if pp.proto == PROTO_UDP else "SCTP"
            ctx.error(
                pline, f"{field}.ports[{j}].protocol", f"{parser} rules apply to TCP, not {proto}"
            )
            return None
        if pp.proto == PROTO_ANY:
            ctx.warn(
                pline,
                f"{field}.ports[{j}].protocol",
                f"{parser} rules apply to TCP only: UDP and SCTP on port {pp.port} are not "
                "allowed by this rule",
            )
            pp = PortProto(pp.port, pp.end_port, PROTO_TCP, pp.name)
        out.append(pp)
    return out


def _parse_l7(node, field, line, ctx: _Ctx) -> tuple[L7Rules | None, bool]:
    """(rules, drop): drop=True when the port rule must be dropped fail-closed."""
    node = _as_dict(ctx, node, field, line)
    if node is None:
        return None, False
    for key in node:
        if key not in ("http", "kafka", "dns", "l7proto", "l7"):
            ctx.error(_ln(node, key, line), f"{field}.{key}", "unknown L7 rule type")
    present = [k for k in ("http", "kafka", "dns", "l7proto") if k in node]
    if len(present) > 1:
        ctx.error(
            _ln(node, present[1], line),
            f"{field}.{present[1]}",
            f"two L7 parser types on one port ({' and '.join(present)})",
        )
        return None, False
    if "dns" in node:
        patterns = _as_list(ctx, node["dns"], f"{field}.dns", _ln(node, "dns", line))
        if any(isinstance(p, dict) and p.get("matchPattern") == "*" for p in patterns):
            ctx.warn(
                _ln(node, "dns", line),
                f"{field}.dns",
                "DNS rules are not enforced: matchPattern '*' allows every name, so the port is "
                "allowed at L4 without DNS visibility or FQDN learning",
            )
            return None, False
        ctx.warn(
            _ln(node, "dns", line),
            f"{field}.dns",
            "DNS rules are not enforced: this port rule is dropped, so DNS to these peers is not "
            "allowed by it",
        )
        return None, True
    if "l7proto" in node or "l7" in node:
        key = "l7proto" if "l7proto" in node else "l7"
        ctx.warn(
            _ln(node, key, line),
            f"{field}.{key}",
            "generic L7 parsers (l7proto) are not enforced: this port rule is dropped, so these "
            "ports are not allowed by it",
        )
        return None, True
    if "http" in node:
        items = _as_list(ctx, node["http"], f"{field}.http", _ln(node, "http", line))
        rules = [
            r
            for i, it in enumerate(items)
            if (r := _parse_http(it, f"{field}.http[{i}]", _ln(items, i, line), ctx)) is not None
        ]
        return L7Rules("http", http=tuple(rules)), False
    if "kafka" in node:
        items = _as_list(ctx, node["kafka"], f"{field}.kafka", _ln(node, "kafka", line))
        rules = [
            r
            for i, it in enumerate(items)
            if (r := _parse_kafka(it, f"{field}.kafka[{i}]", _ln(items, i, line), ctx)) is not None
        ]
        return L7Rules("kafka", kafka=tuple(rules)), False
    return None, False


def _check_regex(ctx, value, field, line) -> str | None:
    if not isinstance(value, str):
        ctx.error(line, field, f"must be a string (an RE2 regular expression), got {value!r}")
        return None
    try:
        re2.compile(value, options=_QUIET)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        ctx.error(line, field, f"invalid RE2 regular expression {value!r}: {reason}")
        return None
    return value


def _parse_http(item, field, line, ctx: _Ctx) -> HttpRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    ok = True
    for key in item:
        if key not in HTTP_KEYS:
            ctx.error(_ln(item, key, line), f"{field}.{key}", "unknown HTTP rule field")
            ok = False
    values = {}
    for key in ("method", "path", "host"):
        if key in item and item[key] not in (None, ""):
            v = _check_regex(ctx, item[key], f"{field}.{key}", _ln(item, key, line))
            if v is None:
                ok = False
            values[key] = v or ""
    headers: list[HeaderMatch] = []
    hnode = _as_list(ctx, item.get("headers"), f"{field}.headers", _ln(item, "headers", line))
    for i, h in enumerate(hnode):
        if not isinstance(h, str) or not h.strip():
            ctx.error(
                _ln(hnode, i, line), f"{field}.headers[{i}]", "must be 'Name value' or 'Name'"
            )
            ok = False
            continue
        name, sep, value = h.strip().partition(" ")
        headers.append(HeaderMatch(name.rstrip(":"), value if sep else None))
    mnode = _as_list(
        ctx, item.get("headerMatches"), f"{field}.headerMatches", _ln(item, "headerMatches", line)
    )
    for i, m in enumerate(mnode):
        mfield, mline = f"{field}.headerMatches[{i}]", _ln(mnode, i, line)
        if not isinstance(m, dict) or not m.get("name"):
            ctx.error(mline, mfield, "needs name (and value, mismatch)")
            ok = False
            continue
        for key in m:
            if key not in ("name", "value", "secret", "mismatch"):
                ctx.error(_ln(m, key, mline), f"{mfield}.{key}", "unknown field")
                ok = False
        mismatch = str(m.get("mismatch") or "").upper()
        if mismatch not in MISMATCH_ACTIONS:
            ctx.error(
                _ln(m, "mismatch", mline),
                f"{mfield}.mismatch",
                f"unknown mismatch action {m.get('mismatch')!r}; expected LOG, ADD, DELETE or REPLACE",
            )
            ok = False
            continue
        if "secret" in m:
            if mismatch:
                ctx.warn(
                    _ln(m, "secret", mline),
                    f"{mfield}.secret",
                    "header values from Kubernetes secrets are not loaded: the "
                    f"{mismatch} action for header {m['name']!r} is not applied",
                )
                continue
            ctx.warn(
                _ln(m, "secret", mline),
                f"{mfield}.secret",
                "header values from Kubernetes secrets are not loaded: this HTTP rule never "
                "matches (fail closed)",
            )
            return HttpRule(method="(?!)", path="(?!)")  # never matches
        value = m.get("value")
        headers.append(HeaderMatch(str(m["name"]), None if value is None else str(value), mismatch))
    if not ok:
        return None
    return HttpRule(
        values.get("method", ""), values.get("path", ""), values.get("host", ""), tuple(headers)
    )


def _parse_kafka(item, field, line, ctx: _Ctx) -> KafkaRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    for key in item:
        if key not in KAFKA_KEYS:
            ctx.error(_ln(item, key, line), f"{field}.{key}", "unknown Kafka rule field")
            return None
    if item.get("role") and item.get("apiKey"):
        ctx.error(
            _ln(item, "apiKey", line), f"{field}.apiKey", "role and apiKey are mutually exclusive"
        )
        return None
    keys: tuple[int, ...] = ()
    text = []
    if item.get("role"):
        role = str(item["role"]).lower()
        if role not in kafka_keys.ROLES:
            ctx.error(
                _ln(item, "role", line),
                f"{field}.role",
                f"unknown role {item['role']!r}; expected produce or consume",
            )
            return None
        keys = kafka_keys.ROLES[role]
        text.append(f"role={role}")
    elif item.get("apiKey") not in (None, ""):
        number = kafka_keys.api_key_number(item["apiKey"])
        if number is None:
            ctx.error(
                _ln(item, "apiKey", line),
                f"{field}.apiKey",
                f"unknown Kafka apiKey {item['apiKey']!r}; expected a number or one of "
                + ", ".join(kafka_keys.API_KEYS),
            )
            return None
        keys = (number,)
        text.append(f"apiKey={kafka_keys.api_key_name(number)}")
    version = None
    if item.get("apiVersion") not in (None, ""):
        raw = str(item["apiVersion"]).strip()
        if not raw.isdigit() or int(raw) > 32767:
            ctx.error(
                _ln(item, "apiVersion", line),
                f"{field}.apiVersion",
                f"invalid apiVersion {item['apiVersion']!r}",
            )
            return None
        version = int(raw)
        text.append(f"apiVersion={version}")
    client = str(item.get("clientID") or "")
    if client:
        text.append(f"clientID={client}")
    topic = str(item.get("topic") or "")
    if topic:
        if not KAFKA_TOPIC.match(topic):
            ctx.error(
                _ln(item, "topic", line), f"{field}.topic", f"invalid Kafka topic name {topic!r}"
            )
            return None
        text.append(f"topic={topic}")
    return KafkaRule(keys, version, client, topic, "{" + " ".join(text) + "}" if text else "{any}")


def _parse_icmps(item, field, line, ctx: _Ctx) -> list[ICMPField]:
    out = []
    node = _as_list(ctx, item.get("icmps"), f"{field}.icmps", _ln(item, "icmps", line))
    for i, entry in enumerate(node):
        efield, eline = f"{field}.icmps[{i}]", _ln(node, i, line)
        fields = _as_list(
            ctx,
            (entry or {}).get("fields") if isinstance(entry, dict) else None,
            f"{efield}.fields",
            eline,
        )
        for j, f in enumerate(fields):
            ffield, fline = f"{efield}.fields[{j}]", _ln(fields, j, eline)
            if not isinstance(f, dict) or "type" not in f:
                ctx.error(fline, ffield, "needs type (and family)")
                continue
            family = str(f.get("family") or "IPv4")
            if family not in ("IPv4", "IPv6"):
                ctx.error(
                    _ln(f, "family", fline),
                    f"{ffield}.family",
                    f"unknown family {family!r}; expected IPv4 or IPv6",
                )
                continue
            number = icmp.icmp_type(family, f["type"])
            if number is None:
                ctx.error(
                    _ln(f, "type", fline),
                    f"{ffield}.type",
                    f"unknown {family} ICMP type {f['type']!r}",
                )
                continue
            out.append(ICMPField(family, number))
    return out


# ---------------------------------------------------------------------------------------------
# Kubernetes NetworkPolicy (networking.k8s.io/v1), translated the way Cilium does


def _parse_knp(doc, name, line, ctx: _Ctx) -> list[Rule]:
    spec = _as_dict(ctx, doc.get("spec"), "spec", _ln(doc, "spec", line))
    if spec is None:
        return []
    sline = _ln(doc, "spec", line)
    for key in spec:
        if key not in ("podSelector", "policyTypes", "ingress", "egress"):
            ctx.error(_ln(spec, key, sline), f"spec.{key}", "unknown field")
    if "podSelector" not in spec:
        ctx.error(sline, "spec.podSelector", "is required")
        return []
    sel = _parse_selector(
        spec["podSelector"], "spec.podSelector", _ln(spec, "podSelector", sline), ctx
    )
    if sel is None:
        return []
    types = spec.get("policyTypes")
    if types is None:
        types = ["Ingress"] + (["Egress"] if "egress" in spec else [])
    for i, t in enumerate(
        _as_list(ctx, types, "spec.policyTypes", _ln(spec, "policyTypes", sline))
    ):
        if t not in ("Ingress", "Egress"):
            ctx.error(
                _ln(spec, "policyTypes", sline),
                f"spec.policyTypes[{i}]",
                f"unknown policy type {t!r}",
            )
    sections = {}
    for key, peer_key in (("ingress", "from"), ("egress", "to")):
        items = _as_list(ctx, spec.get(key), f"spec.{key}", _ln(spec, key, sline))
        rules = []
        for i, item in enumerate(items):
            rule = _knp_rule(item, f"spec.{key}[{i}]", _ln(items, i, sline), peer_key, ctx)
            if rule is not None:
                rules.append(rule)
        sections[key] = tuple(rules)
    return [
        Rule(
            name=name,
            namespace=ctx.namespace,
            kind=KNP,
            selector=_scope_subject(sel, ctx),
            ingress=sections["ingress"] if "Ingress" in types else (),
            egress=sections["egress"] if "Egress" in types else (),
            has_ingress="Ingress" in types,
            has_egress="Egress" in types,
            file=ctx.file,
            line=line,
        )
    ]


def _knp_rule(item, field, line, peer_key, ctx: _Ctx) -> PeerRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    for key in item:
        if key not in (peer_key, "ports"):
            ctx.error(_ln(item, key, line), f"{field}.{key}", "unknown field")
    endpoints, cidrs = [], []
    peers_node = _as_list(ctx, item.get(peer_key), f"{field}.{peer_key}", _ln(item, peer_key, line))
    for i, peer in enumerate(peers_node):
        pfield, pline = f"{field}.{peer_key}[{i}]", _ln(peers_node, i, line)
        if not isinstance(peer, dict) or not peer:
            ctx.error(pline, pfield, "needs podSelector, namespaceSelector or ipBlock")
            continue
        if "ipBlock" in peer:
            block = peer["ipBlock"]
            if not isinstance(block, dict) or "cidr" not in block:
                ctx.error(_ln(peer, "ipBlock", pline), f"{pfield}.ipBlock.cidr", "is required")
                continue
            got = _parse_cidrs(
                {"xCIDRSet": [block]}, "x", f"{pfield}.ipBlock", _ln(peer, "ipBlock", pline), ctx
            )
            cidrs.extend(got)
            continue
        pod = ns = None
        if "podSelector" in peer:
            pod = _parse_selector(
                peer["podSelector"], f"{pfield}.podSelector", _ln(peer, "podSelector", pline), ctx
            )
        if "namespaceSelector" in peer:
            ns = _parse_selector(
                peer["namespaceSelector"],
                f"{pfield}.namespaceSelector",
                _ln(peer, "namespaceSelector", pline),
                ctx,
            )
        reqs = list(pod.requirements) if pod else []
        if ns is None:
            reqs.append(Requirement("k8s", NAMESPACE_KEY, "In", (ctx.namespace,)))
        else:
            reqs.extend(
                Requirement("k8s", NAMESPACE_LABEL_PREFIX + r.key, r.operator, r.values)
                for r in ns.requirements
            )
            reqs.append(Requirement("k8s", NAMESPACE_KEY, "Exists"))
        endpoints.append(Selector(tuple(reqs)))
    ports = []
    pnode = _as_list(ctx, item.get("ports"), f"{field}.ports", _ln(item, "ports", line))
    for j, p in enumerate(pnode):
        if isinstance(p, dict) and "protocol" not in p:
            p = {**p, "protocol": "TCP"}
        pp = _parse_port(p, f"{field}.ports[{j}]", _ln(pnode, j, line), ctx)
        if pp is not None:
            ports.append(
                pp if pp.proto != PROTO_ANY else PortProto(pp.port, pp.end_port, PROTO_TCP, pp.name)
            )
    no_peers = peer_key not in item or not peers_node
    peers = Peers(endpoints=tuple(endpoints), cidrs=tuple(cidrs), wildcard=no_peers)
    if no_peers:
        # Kubernetes: a rule without from/to matches all sources, inside and outside the cluster.
        peers = Peers(entities=("all",), wildcard=True)
    return PeerRule(peers=peers, ports=(PortRule(tuple(ports)),) if ports else (), line=line)
