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
    _check_keys,
    _Ctx,
    _items,
    _ln,
    _scope_subject,
    _selector_at,
)
from policies.parse_l4 import _cidr_set_entry, _parse_port

KNP = "NetworkPolicy"


def _parse_knp(doc, name, line, ctx: _Ctx) -> list[Rule]:
    sline = _ln(doc, "spec", line)
    spec = _as_dict(ctx, doc.get("spec"), "spec", sline)
    if spec is None:
        return []
    _check_keys(ctx, spec, ("podSelector", "policyTypes", "ingress", "egress"), "spec", sline)
    if "podSelector" not in spec:
        ctx.error(sline, "spec.podSelector", "is required")
        return []
    sel = _selector_at(spec, "podSelector", "spec", sline, ctx)
    if sel is None:
        return []
    types = _policy_types(spec, sline, ctx)
    sections = {}
    for key, peer_key in (("ingress", "from"), ("egress", "to")):
        sections[key] = tuple(
            rule
            for item, ifield, iline in _items(ctx, spec, key, "spec", sline)
            if (rule := _knp_rule(item, ifield, iline, peer_key, ctx)) is not None
        )
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


def _policy_types(spec, sline, ctx: _Ctx) -> list:
    """policyTypes; by default Ingress, plus Egress when there is an egress section."""
    if spec.get("policyTypes") is None:
        return ["Ingress"] + (["Egress"] if "egress" in spec else [])
    types = _as_list(ctx, spec["policyTypes"], "spec.policyTypes", _ln(spec, "policyTypes", sline))
    for i, t in enumerate(types):
        if t not in ("Ingress", "Egress"):
            ctx.error(
                _ln(spec, "policyTypes", sline),
                f"spec.policyTypes[{i}]",
                f"unknown policy type {t!r}",
            )
    return types


def _knp_rule(item, field, line, peer_key, ctx: _Ctx) -> PeerRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    _check_keys(ctx, item, (peer_key, "ports"), field, line)
    endpoints, cidrs = [], []
    for peer, pfield, pline in _items(ctx, item, peer_key, field, line):
        if not isinstance(peer, dict) or not peer:
            ctx.error(pline, pfield, "needs podSelector, namespaceSelector or ipBlock")
        elif "ipBlock" in peer:
            cidr = _ip_block(peer, pfield, pline, ctx)
            cidrs.extend([cidr] if cidr is not None else [])
        else:
            endpoints.append(_knp_peer(peer, pfield, pline, ctx))
    ports = []
    for p, field_j, line_j in _items(ctx, item, "ports", field, line):
        if isinstance(p, dict) and "protocol" not in p:
            p = {**p, "protocol": "TCP"}
        pp = _parse_port(p, field_j, line_j, ctx, require_port=False)
        if pp is not None:
            ports.append(
                pp if pp.proto != PROTO_ANY else PortProto(pp.port, pp.end_port, PROTO_TCP, pp.name)
            )
    if not item.get(peer_key):
        # Kubernetes: a rule without from/to matches all sources, inside and outside the cluster.
        peers = Peers(entities=("all",), wildcard=True)
    else:
        peers = Peers(endpoints=tuple(endpoints), cidrs=tuple(cidrs), wildcard=False)
    return PeerRule(peers=peers, ports=(PortRule(tuple(ports)),) if ports else (), line=line)


def _ip_block(peer, pfield, pline, ctx: _Ctx):
    block = peer["ipBlock"]
    bline = _ln(peer, "ipBlock", pline)
    if not isinstance(block, dict) or "cidr" not in block:
        ctx.error(bline, f"{pfield}.ipBlock.cidr", "is required")
        return None
    return _cidr_set_entry(block, f"{pfield}.ipBlock", bline, ctx)


def _knp_peer(peer, pfield, pline, ctx: _Ctx) -> Selector:
    """podSelector/namespaceSelector as one selector, the way Cilium translates them."""
    pod = ns = None
    if "podSelector" in peer:
        pod = _selector_at(peer, "podSelector", pfield, pline, ctx)
    if "namespaceSelector" in peer:
        ns = _selector_at(peer, "namespaceSelector", pfield, pline, ctx)
    reqs = list(pod.requirements) if pod else []
    if ns is None:
        reqs.append(Requirement("k8s", NAMESPACE_KEY, "In", (ctx.namespace,)))
    else:
        reqs.extend(
            Requirement("k8s", NAMESPACE_LABEL_PREFIX + r.key, r.operator, r.values)
            for r in ns.requirements
        )
        reqs.append(Requirement("k8s", NAMESPACE_KEY, "Exists"))
    return Selector(tuple(reqs))
