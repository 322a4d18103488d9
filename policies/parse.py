"""Turn policy documents (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy)
into `Rule`s, collecting `FILE:LINE: FIELD: reason` diagnostics on the way.

Unsupported fields are never dropped silently: each one gets a named diagnostic. When the rest of
the file can still be enforced fail-closed (the unsupported part only ever *adds* allowed traffic),
the diagnostic is a warning that says what is not enforced; otherwise it is an error.
"""

from __future__ import annotations

from policies.labels import (
    DEFAULT_NAMESPACE,
    Selector,
)
from policies.model import (
    ENTITIES,
    PeerRule,
    Peers,
    Rule,
)
from policies.netpol import _parse_knp
from policies.parse_common import (
    CCNP,
    CNP,
    KNP,
    _as_dict,
    _as_list,
    _Ctx,
    _ln,
    _parse_selector,
    _scope_peer,
    _scope_subject,
)
from policies.parse_l4 import _parse_cidrs, _parse_icmps, _parse_to_ports

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

__all__ = ["parse_document", "_Ctx", "KINDS"]


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
    if not isinstance(kind, str) or kind not in KINDS:
        api = str(doc.get("apiVersion") or "")
        if isinstance(kind, str) and kind and _other_manifest(api, kind):
            # a Deployment or Service next to the policies (as in Cilium's demo manifests)
            ctx.warn(
                _ln(doc, "kind", line),
                "kind",
                f"{api} {kind} is not a network policy: skipped",
            )
            return []
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
# Rules


def _other_manifest(api: str, kind: str) -> bool:
    """A well-formed Kubernetes object that is plainly not a policy (a typo of a policy kind, or
    any other kind in Cilium's API group, stays an error)."""
    group = api.rpartition("/")[0]
    if not api or group.startswith("cilium.io") or "Policy" in kind or "Polic" in kind:
        return False
    return kind[:1].isupper() and kind.isalnum()


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
