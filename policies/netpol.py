"""Kubernetes NetworkPolicy (networking.k8s.io/v1) translated into the rule model the way Cilium
translates it."""

from __future__ import annotations

from policies.labels import (
    NAMESPACE_KEY,
    NAMESPACE_LABEL_PREFIX,
    Requirement,
    Selector,
)
from policies.model import (
    PROTO_ANY,
    PROTO_TCP,
    PeerRule,
    Peers,
    PortProto,
    PortRule,
    Rule,
)
from policies.parse_common import (
    _as_dict,
    _as_list,
    _Ctx,
    _ln,
    _parse_selector,
    _scope_subject,
)
from policies.parse_l4 import _parse_cidrs, _parse_port

KNP = "NetworkPolicy"


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
    elif not isinstance(types, list):
        types = _as_list(ctx, types, "spec.policyTypes", _ln(spec, "policyTypes", sline))
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
