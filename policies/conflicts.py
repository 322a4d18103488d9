"""Cross-rule validation: two L7 parser types on one port of the same endpoints.

Cilium keeps one L4 filter per port and direction for an endpoint, merged over every peer, so one
port can carry one L7 parser. Rules with the same subject selector always meet on the same
endpoints, so a clash among them is a validation error (rules that only sometimes overlap are
caught at compile time, where the port is denied and a diagnostic names it).
"""

from __future__ import annotations

from collections.abc import Iterable

from policies.diagnostics import ERROR, Diagnostic
from policies.model import PROTO_ANY, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerRule, Rule

_ANY = frozenset({PROTO_TCP, PROTO_UDP, PROTO_SCTP})


def _spans(pr: PeerRule, parser_rules):
    for port_rule in parser_rules:
        for pp in port_rule.ports:
            protos = _ANY if pp.proto == PROTO_ANY else frozenset({pp.proto})
            lo, hi = (0, 65535) if pp.port == 0 else (pp.port, pp.end_port)
            yield protos, lo, hi, pp


def parser_conflicts(rules: Iterable[Rule]) -> list[Diagnostic]:
    groups: dict[tuple, list[Rule]] = {}
    for rule in rules:
        groups.setdefault((rule.selector, rule.node_selector), []).append(rule)
    out: list[Diagnostic] = []
    for members in groups.values():
        for direction in ("ingress", "egress"):
            seen: list[tuple[frozenset, int, int, str, Rule]] = []
            for rule in members:
                for pr in getattr(rule, direction):
                    l7_rules = [p for p in pr.ports if p.l7 is not None]
                    for protos, lo, hi, pp in _spans(pr, l7_rules):
                        parser = next(p.l7.parser for p in l7_rules if pp in p.ports)
                        for o_protos, o_lo, o_hi, o_parser, o_rule in seen:
                            if (
                                o_parser != parser
                                and protos & o_protos
                                and lo <= o_hi
                                and o_lo <= hi
                            ):
                                where = "" if o_rule is rule else f" (other rule: {o_rule.ident})"
                                out.append(
                                    Diagnostic(
                                        rule.file,
                                        pr.line,
                                        f"{pr.path}.toPorts",
                                        f"port {pp} has two L7 parser types ({o_parser} and "
                                        f"{parser}){where}",
                                        ERROR,
                                    )
                                )
                                break
                        seen.append((protos, lo, hi, parser, rule))
    return out
