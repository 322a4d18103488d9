"""Shared pieces of policy parsing: the diagnostics context, typed access to YAML nodes
with their lines, label selectors and Cilium's namespace scoping."""

from __future__ import annotations

import re

from policies.diagnostics import ERROR, WARNING, Diagnostic
from policies.fqdn import FQDNSelector, check_selector
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


MAX_DIAGNOSTICS = 1000  # per file: a 4 MiB file of broken entries must not give a million


class _Ctx:
    """Where we are (file, kind, namespace) and the diagnostics collected so far (at most
    MAX_DIAGNOSTICS of one file are kept; one more says how many were left out, and it is an
    error as soon as any left-out problem is one)."""

    def __init__(self, file: str, diagnostics: list[Diagnostic]):
        self.file = file
        self.diagnostics = diagnostics
        self.namespace = ""
        self.clusterwide = False
        self.count = 0
        self.errors = 0
        self._overflow: int | None = None  # index of the "left out" diagnostic

    def error(self, line: int, field: str, reason: str) -> None:
        self._add(Diagnostic(self.file, line, field, reason, ERROR))

    def warn(self, line: int, field: str, reason: str) -> None:
        self._add(Diagnostic(self.file, line, field, reason, WARNING))

    def _add(self, diag: Diagnostic) -> None:
        self.count += 1
        self.errors += diag.is_error
        if self.count <= MAX_DIAGNOSTICS:
            self.diagnostics.append(diag)
            return
        severity = ERROR if diag.is_error else WARNING
        if self._overflow is None:
            self._overflow = len(self.diagnostics)
            self.diagnostics.append(None)
        elif self.diagnostics[self._overflow].is_error:
            severity = ERROR
        self.diagnostics[self._overflow] = Diagnostic(
            self.file,
            diag.line,
            "file",
            f"more than {MAX_DIAGNOSTICS} problems in this file; the rest are not listed",
            severity,
        )

    def error_count(self) -> int:
        return self.errors


def _ln(node, key=None, default: int = 1) -> int:
    if key is not None and isinstance(node, (LDict, LList)):
        return node.line_of(key)
    return getattr(node, "line", default) or default


def _key_error(ctx: _Ctx, node, key: str, field: str, line: int, reason: str) -> None:
    """An error about `node[key]`, at its line."""
    ctx.error(_ln(node, key, line), f"{field}.{key}", reason)


def _unenforced(ctx: _Ctx, node, key: str, field: str, line: int, deny: bool, **why) -> bool:
    """A field this engine does not enforce: in an allow rule a warning (`why["warning"]`; what it
    would allow is not allowed), in a deny rule an error (`why["error"]`: dropping it would allow
    more). True when the field is there."""
    if key not in node:
        return False
    kline, kfield = _ln(node, key, line), f"{field}.{key}"
    if deny:
        ctx.error(kline, kfield, why["error"])
    else:
        ctx.warn(kline, kfield, why["warning"])
    return True


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


def _check_keys(ctx: _Ctx, node, allowed, field: str, line: int, what: str = "field") -> bool:
    """An `unknown field` error for every key of `node` outside `allowed`; True when none."""
    ok = True
    for key in node:
        if key not in allowed:
            ctx.error(_ln(node, key, line), f"{field}.{key}", f"unknown {what}")
            ok = False
    return ok


def _items(ctx: _Ctx, parent, key: str, field: str, line: int):
    """(item, item field, item line) for each entry of the list `parent[key]` (absent: none)."""
    kfield = f"{field}.{key}" if field else key
    node = _as_list(ctx, parent.get(key), kfield, _ln(parent, key, line))
    for i, item in enumerate(node):
        yield item, f"{kfield}[{i}]", _ln(node, i, line)


def _selector_at(parent, key: str, field: str, line: int, ctx: _Ctx) -> Selector | None:
    """The label selector `parent[key]`."""
    return _parse_selector(parent[key], f"{field}.{key}", _ln(parent, key, line), ctx)


def _selectors(ctx: _Ctx, parent, key: str, field: str, line: int) -> list[Selector]:
    """The list of label selectors `parent[key]`; broken ones are reported and left out."""
    out = []
    for node, sfield, sline in _items(ctx, parent, key, field, line):
        sel = _parse_selector(node, sfield, sline, ctx)
        if sel is not None:
            out.append(sel)
    return out


_OPERATORS = {"in": "In", "notin": "NotIn", "exists": "Exists", "doesnotexist": "DoesNotExist"}
# Kubernetes label syntax (ValidateLabelSelector): a name or value of at most 63 characters,
# alphanumeric at both ends; a key may carry a DNS-subdomain prefix `example.com/`.
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _label_key_problem(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"invalid label key {key!r}: the prefix must be a DNS subdomain"
    if len(name) > 63 or not _LABEL_NAME.match(name):
        return (
            f"invalid label key {key!r}: at most 63 characters, alphanumeric at both ends, "
            "'-', '_' and '.' between"
        )
    return None


def _label_value_problem(value: str) -> str | None:
    if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
        return (
            f"invalid label value {value!r}: at most 63 characters, alphanumeric at both ends, "
            "'-', '_' and '.' between"
        )
    return None


def _requirement(ctx: _Ctx, key, op: str, values, field: str, line: int) -> Requirement | None:
    source, k = split_source(str(key))
    problem = _label_key_problem(k) or next(
        (p for v in values if (p := _label_value_problem(v)) is not None), None
    )
    if problem is not None:
        ctx.error(line, field, problem)
        return None
    return Requirement(source, k, op, tuple(values))


def _match_labels(ctx: _Ctx, node, field: str, line: int) -> list[Requirement]:
    labels = _as_dict(
        ctx, node.get("matchLabels"), f"{field}.matchLabels", _ln(node, "matchLabels", line)
    )
    out = []
    for key, value in (labels or {}).items():
        value = "" if value is None else str(value)
        req = _requirement(
            ctx, key, "In", (value,), f"{field}.matchLabels.{key}", _ln(labels, key, line)
        )
        if req is not None:
            out.append(req)
    return out


def _expression(ctx: _Ctx, expr, efield: str, eline: int) -> Requirement | None:
    if not isinstance(expr, dict) or "key" not in expr or "operator" not in expr:
        ctx.error(eline, efield, "needs key and operator")
        return None
    op_text = str(expr["operator"])
    op = _OPERATORS.get(op_text.lower())
    if op is None:
        _key_error(
            ctx,
            expr,
            "operator",
            efield,
            eline,
            f"unknown operator {op_text!r}; expected In, NotIn, Exists or DoesNotExist",
        )
        return None
    values = _as_list(ctx, expr.get("values"), f"{efield}.values", _ln(expr, "values", eline))
    if op in ("In", "NotIn") and not values:
        ctx.error(_ln(expr, "operator", eline), f"{efield}.values", f"{op} needs values")
        return None
    if op in ("Exists", "DoesNotExist") and values:
        _key_error(ctx, expr, "values", efield, eline, f"{op} must not have values")
        return None
    return _requirement(
        ctx, expr["key"], op, [str(v) for v in values], efield, _ln(expr, "key", eline)
    )


def _parse_selector(node, field: str, line: int, ctx: _Ctx) -> Selector | None:
    node = _as_dict(ctx, node, field, line)
    if node is None:
        return None
    _check_keys(ctx, node, ("matchLabels", "matchExpressions"), field, line, "selector field")
    reqs = _match_labels(ctx, node, field, line)
    for expr, efield, eline in _items(ctx, node, "matchExpressions", field, line):
        req = _expression(ctx, expr, efield, eline)
        if req is not None:
            reqs.append(req)
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


def _fqdn_selectors(ctx: _Ctx, parent, key: str, field: str, line: int) -> list[FQDNSelector]:
    """`KEY: [{matchName: ...} | {matchPattern: ...}]` (toFQDNs, rules.dns), each entry checked
    as Cilium's CRD checks it."""
    out = []
    for entry, efield, eline in _items(ctx, parent, key, field, line):
        keys = [k for k in ("matchName", "matchPattern") if isinstance(entry, dict) and k in entry]
        if not isinstance(entry, dict) or len(keys) != 1 or len(entry) != 1:
            ctx.error(eline, efield, "needs exactly one of matchName or matchPattern")
            continue
        why = check_selector(keys[0], entry[keys[0]])
        if why:
            _key_error(ctx, entry, keys[0], efield, eline, why)
            continue
        name = entry[keys[0]]
        out.append(FQDNSelector(name, "") if keys[0] == "matchName" else FQDNSelector("", name))
    return out
