"""Turn policy documents (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy)
into `Rule`s, collecting `FILE:LINE: FIELD: reason` diagnostics on the way.

Unsupported fields are never dropped silently: each one gets a named diagnostic. When the rest of
the file can still be enforced fail-closed (the unsupported part only ever *adds* allowed traffic),
the diagnostic is a warning that says what is not enforced; otherwise it is an error. What Cilium's
own validation refuses is refused here too (docs/policy.md lists each check).
"""

from __future__ import annotations

from policies.labels import DEFAULT_NAMESPACE
from policies.model import PeerRule, Rule
from policies.netpol import _parse_knp
from policies.parse_common import (
    CCNP,
    CNP,
    KNP,
    _as_dict,
    _as_list,
    _check_keys,
    _Ctx,
    _items,
    _key_error,
    _ln,
    _scope_subject,
    _selector_at,
)
from policies.parse_peers import _parse_peer_rule

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
# The top level of a Kubernetes object; anything else (an `ingress:` outside `spec:`) would be
# dropped by the API server, leaving a policy that selects endpoints and enforces nothing.
OBJECT_KEYS = {"apiVersion", "kind", "metadata", "status"}
CILIUM_OBJECT_KEYS = OBJECT_KEYS | {"spec", "specs"}
METADATA_KEYS = {
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "generation",
    "generateName",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "ownerReferences",
    "finalizers",
    "managedFields",
}
SECTIONS = (
    ("ingress", "in", False),
    ("ingressDeny", "in", True),
    ("egress", "out", False),
    ("egressDeny", "out", True),
)

__all__ = ["parse_document", "_Ctx", "KINDS"]


# ---------------------------------------------------------------------------------------------
# Documents


def parse_document(doc, line: int, ctx: _Ctx) -> list[Rule]:
    if not isinstance(doc, dict):
        ctx.error(line, "document", "must be a mapping with apiVersion and kind")
        return []
    kind = doc.get("kind")
    if kind == "List" or (kind is None and isinstance(doc.get("items"), list)):
        return _parse_list(doc, line, ctx)
    if not _known_kind(doc, kind, line, ctx):
        return []
    allowed = CILIUM_OBJECT_KEYS if kind != KNP else OBJECT_KEYS | {"spec"}
    for key in doc:
        if key not in allowed:
            ctx.error(_ln(doc, key, line), key, _misplaced(key, kind))
    name = _parse_metadata(doc, kind, line, ctx)
    if kind == KNP:
        return _parse_knp(doc, name, line, ctx)
    return _parse_specs(doc, name, kind, line, ctx)


def _parse_list(doc, line: int, ctx: _Ctx) -> list[Rule]:
    rules: list[Rule] = []
    items = _as_list(ctx, doc.get("items"), "items", _ln(doc, "items", line))
    for i, item in enumerate(items):
        rules.extend(parse_document(item, _ln(items, i, line), ctx))
    return rules


def _known_kind(doc, kind, line: int, ctx: _Ctx) -> bool:
    """A policy kind with its apiVersion; other Kubernetes objects are skipped with a warning."""
    api = doc.get("apiVersion")
    if isinstance(kind, str) and kind in KINDS:
        if api == KINDS[kind]:
            return True
        ctx.error(
            _ln(doc, "apiVersion", line),
            "apiVersion",
            f"{kind} needs apiVersion {KINDS[kind]!r}, got {api!r}",
        )
        return False
    api = str(api or "")
    if isinstance(kind, str) and kind and _other_manifest(api, kind):
        # a Deployment or Service next to the policies (as in Cilium's demo manifests)
        ctx.warn(_ln(doc, "kind", line), "kind", f"{api} {kind} is not a network policy: skipped")
        return False
    ctx.error(
        _ln(doc, "kind", line),
        "kind",
        f"unsupported kind {kind!r}; expected one of {', '.join(KINDS)}",
    )
    return False


def _other_manifest(api: str, kind: str) -> bool:
    """A well-formed Kubernetes object that is plainly not a policy (a typo of a policy kind, or
    any other kind in Cilium's API group, stays an error)."""
    group = api.rpartition("/")[0]
    if not api or group.startswith("cilium.io") or "Policy" in kind or "Polic" in kind:
        return False
    return kind[:1].isupper() and kind.isalnum()


def _misplaced(key: str, kind: str) -> str:
    if key in RULE_KEYS or key in ("podSelector", "policyTypes"):
        return f"unknown field at the top level: {key} belongs under spec"
    return f"unknown field of a {kind}"


def _parse_metadata(doc, kind: str, line: int, ctx: _Ctx) -> str:
    """The policy's name; sets the context's namespace (none for a clusterwide policy)."""
    mline = _ln(doc, "metadata", line)
    meta = _as_dict(ctx, doc.get("metadata"), "metadata", mline) or {}
    _check_keys(ctx, meta, METADATA_KEYS, "metadata", mline)
    name = meta.get("name")
    if not name:
        ctx.error(mline, "metadata.name", "is required")
        name = "<unnamed>"
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
    return str(name)


def _parse_specs(doc, name: str, kind: str, line: int, ctx: _Ctx) -> list[Rule]:
    specs: list[tuple[object, str, int]] = []
    if "spec" in doc:
        specs.append((doc["spec"], "spec", _ln(doc, "spec", line)))
    if "specs" in doc:
        specs.extend(_items(ctx, doc, "specs", "", line))
    if not specs:
        ctx.error(line, "spec", f"{kind} needs spec or specs")
    rules = []
    for index, (spec, field, spec_line) in enumerate(specs):
        rule = _parse_spec(spec, field, spec_line, name, kind, index, ctx)
        if rule is not None:
            rules.append(rule)
    return rules


# ---------------------------------------------------------------------------------------------
# Rules


def _parse_spec(spec, field, line, name, kind, index, ctx: _Ctx) -> Rule | None:
    spec = _as_dict(ctx, spec, field, line)
    if spec is None:
        return None
    _check_keys(ctx, spec, RULE_KEYS, field, line)
    subject = _subject(spec, field, line, ctx)
    if subject is None:
        return None
    selector, node_selector = subject
    sections = {
        key: _section(spec, key, field, line, direction, deny, ctx)
        for key, direction, deny in SECTIONS
    }
    if node_selector is not None:
        _no_l7_in_host_policy(sections, ctx)
    dd_in, dd_out = _default_deny(spec, field, line, ctx)
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
        description=_description(spec, field, line, ctx),
        labels=_rule_labels(spec, field, line, ctx),
        file=ctx.file,
        line=line,
        index=index,
    )


def _subject(spec, field, line, ctx: _Ctx):
    """(endpoint selector, node selector): exactly one of them; None when neither is usable."""
    node_problem = None
    if "endpointSelector" in spec and "nodeSelector" in spec:
        node_problem = "endpointSelector and nodeSelector are mutually exclusive"
    elif "nodeSelector" in spec and not ctx.clusterwide:
        node_problem = "only a CiliumClusterwideNetworkPolicy may select nodes"
    if node_problem is not None:
        _key_error(ctx, spec, "nodeSelector", field, line, node_problem)
    if "endpointSelector" in spec:
        sel = _selector_at(spec, "endpointSelector", field, line, ctx)
        return None if sel is None else (_scope_subject(sel, ctx), None)
    if "nodeSelector" in spec:
        sel = _selector_at(spec, "nodeSelector", field, line, ctx)
        return None if sel is None else (None, sel)
    ctx.error(
        line, f"{field}.endpointSelector", "one of endpointSelector or nodeSelector is required"
    )
    return None


def _section(spec, key, field, line, direction, deny, ctx: _Ctx) -> tuple[PeerRule, ...]:
    out = []
    for item, ifield, iline in _items(ctx, spec, key, field, line):
        rule = _parse_peer_rule(item, ifield, iline, direction, deny, ctx)
        if rule is not None:
            out.append(rule)
    return tuple(out)


def _no_l7_in_host_policy(sections, ctx: _Ctx) -> None:
    """Cilium: host policies do not support L7 rules."""
    for rules in sections.values():
        for pr in rules:
            if any(port.l7 is not None for port in pr.ports):
                ctx.error(
                    pr.line,
                    f"{pr.path}.toPorts",
                    "a host policy (nodeSelector) cannot have L7 rules",
                )


def _default_deny(spec, field, line, ctx: _Ctx) -> tuple[bool, bool]:
    """enableDefaultDeny: (ingress, egress), both true unless turned off."""
    out = {"ingress": True, "egress": True}
    if spec.get("enableDefaultDeny") is None:
        return True, True
    dfield, dline = f"{field}.enableDefaultDeny", _ln(spec, "enableDefaultDeny", line)
    node = _as_dict(ctx, spec["enableDefaultDeny"], dfield, dline) or {}
    _check_keys(ctx, node, out, dfield, dline)
    for key, value in node.items():
        if key not in out:
            continue
        if not isinstance(value, bool):
            ctx.error(_ln(node, key, dline), f"{dfield}.{key}", "must be true or false")
        else:
            out[key] = value
    return out["ingress"], out["egress"]


def _rule_labels(spec, field, line, ctx: _Ctx) -> tuple[str, ...]:
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
    return tuple(labels)


def _description(spec, field, line, ctx: _Ctx) -> str:
    description = spec.get("description") or ""
    if not isinstance(description, str):
        _key_error(ctx, spec, "description", field, line, "must be a string")
        description = str(description)
    return description
