"""Shared pieces of policy parsing: the diagnostics context, typed access to YAML nodes
with their lines, label selectors and Cilium's namespace scoping."""

from __future__ import annotations

from policies.diagnostics import ERROR, WARNING, Diagnostic
from policies.labels import (
    NAMESPACE_KEY,
    Requirement,
    Selector,
    split_source,
)
from policies.yamlsrc import LDict, LList

CNP = "CiliumNetworkPolicy"
CCNP = "CiliumClusterwideNetworkPolicy"
KNP = "NetworkPolicy"


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
