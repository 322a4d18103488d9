"""Which rules select which endpoints: by endpointSelector for pods, by nodeSelector for the host,
through a label index so a rule only tests the endpoints that carry its first `In` label; and the
numbers a named port stands for."""

from __future__ import annotations

from collections.abc import Mapping

from policies.labels import LabelSet
from policies.model import INGRESS, Rule


def is_host(labels: LabelSet) -> bool:
    return any(label.source == "reserved" and label.key == "host" for label in labels)


def selects(rule: Rule, labels: LabelSet) -> bool:
    if is_host(labels):
        return rule.node_selector is not None and rule.node_selector.matches(labels)
    return rule.selector is not None and rule.selector.matches(labels)


def select_rules(
    rules: tuple[Rule, ...], endpoints: Mapping[str, LabelSet], reuse: dict | None = None
) -> tuple[dict[str, list[Rule]], dict[Rule, tuple[str, ...]]]:
    """For each endpoint, the rules that select it (in rule order), via a label index so a rule
    only tests the endpoints that carry its first `In` label. `reuse` holds the endpoints each
    rule selected last time (valid when the endpoints did not change)."""
    out: dict[str, list[Rule]] = {name: [] for name in endpoints}
    selected: dict[Rule, tuple[str, ...]] = {}
    hosts = [name for name, labels in endpoints.items() if is_host(labels)]
    host_set = set(hosts)
    index: dict[tuple[str, str], list[str]] = {}
    by_key: dict[str, list[str]] = {}
    for name, labels in endpoints.items():
        if name in host_set:
            continue
        for label in labels:
            index.setdefault((label.key, label.value), []).append(name)
            by_key.setdefault(label.key, []).append(name)
    pods = [name for name in endpoints if name not in host_set]
    for rule in rules:
        known = reuse.get(rule) if reuse else None
        if known is not None:
            for name in known:
                out[name].append(rule)
            selected[rule] = known
            continue
        sel = rule.selector
        if sel is not None:
            candidates = pods
            for req in sel.requirements:
                if req.operator == "In":
                    found: list[str] = []
                    for value in req.values:
                        found.extend(index.get((req.key, value), ()))
                    candidates = found
                    break
                if req.operator == "Exists":
                    candidates = by_key.get(req.key, [])
                    break
            names = [name for name in dict.fromkeys(candidates) if sel.matches(endpoints[name])]
        else:
            names = []
        if rule.node_selector is not None:
            names += [name for name in hosts if rule.node_selector.matches(endpoints[name])]
        for name in names:
            out[name].append(rule)
        selected[rule] = tuple(names)
    return out, selected


def has_named_ports(rule: Rule) -> bool:
    for section in (rule.ingress, rule.egress):
        for pr in section:
            for port_rule in pr.ports:
                if any(pp.name for pp in port_rule.ports):
                    return True
    return False


def named_port_numbers(
    named_ports: Mapping[str, Mapping[str, int]], name: str, direction: int, own: str
) -> list[int]:
    """The numbers a policy's port `name` stands for on endpoint `own`: for ingress the names
    `own` itself gave its ports, for egress any endpoint's (the peers')."""
    if direction == INGRESS:
        tables = [named_ports.get(own, {})]
    else:
        tables = list(named_ports.values())
    return sorted({t[name] for t in tables if name in t})
