"""Which L7 rules apply to one proxied connection, from the agent's live state (the node and
sidecar proxies ask per connection; the gateway's one-endpoint counterpart is gateway_policy.py).

A connection between two peers can meet L7 rules twice: the source endpoint's egress policy and
the destination endpoint's ingress policy. Cilium applies both; so does `Both`, which passes a
request only when each side's rule set passes it. Rules are re-read from the agent's current
CompiledPolicy when a new one is installed, so a new revision applies to the next request of an
open connection: a tightened rule, or a port the policy now denies, stops it.
"""

from __future__ import annotations

from dataclasses import dataclass

import policies
from l7proxy.listener_decision import L4Decision

PROTO_TCP = 6


class Both:
    """Two rule sets of the same parser, ANDed (egress of the source, ingress of the destination)."""

    def __init__(self, first, second) -> None:
        self.first, self.second = first, second
        self.parser = first.parser
        self.allow_all = first.allow_all and second.allow_all

    def check(self, *args, **kw):
        a = self.first.check(*args, **kw)
        if not a.allowed:
            return a
        b = self.second.check(*args, **kw)
        if not b.allowed:
            return b
        if self.parser == "http":
            return policies.HttpVerdict(True, a.matched, a.header_actions + b.header_actions)
        return a

    def topic_visible(self, topic: str) -> bool:
        return self.first.topic_visible(topic) and self.second.topic_visible(topic)


@dataclass(frozen=True, slots=True)
class ConnPolicy:
    decision: L4Decision
    rules: object  # callable returning the rule set (or None = allow all)
    direction: str
    src_identity: int
    dst_identity: int
    dst_labels: tuple[str, ...]


def _verdicts(compiled, agent, src_ip: str, dst_ip: str, dport: int):
    """(identities, labels, per-side (verdict, direction)) for a connection under `compiled`."""
    src_id, src_labels, src_ep = agent.peer(src_ip)
    dst_id, dst_labels, dst_ep = agent.peer(dst_ip)
    sides = []  # (endpoint, peer identity, direction)
    if src_ep is not None:
        sides.append((src_ep, dst_id, policies.EGRESS))
    if dst_ep is not None:
        sides.append((dst_ep, src_id, policies.INGRESS))
    verdicts = [
        (policies.l4_verdict(compiled, ep, peer, direction, PROTO_TCP, dport), direction)
        for ep, peer, direction in sides
    ]
    return (src_id, src_labels, dst_id, dst_labels, dst_ep), verdicts


def _rule_set(compiled, verdicts, parser: str | None):
    """The L7 rules one request of an open connection meets under `compiled`: None when the
    policy now allows the port without L7 rules; a rule set that passes nothing when it now
    denies the connection or asks for another protocol's parser (fail closed)."""
    if any(v.action == "deny" for v, _ in verdicts):
        return _nothing(parser)
    sets = [compiled.l7.get(v.l7_id) for v, _ in verdicts if v.action == "redirect"]
    if any(s is None for s in sets):  # a redirect to a rule set the policy lacks: never pass
        return _nothing(parser)
    if not sets:
        return None
    if parser is not None and any(s.parser != parser for s in sets):
        return _nothing(parser)
    if len(sets) == 2 and sets[0].parser == sets[1].parser:
        return Both(sets[0], sets[1])
    if len(sets) == 2:
        return _nothing(parser)
    return sets[0]


_NOTHING: dict[str, object] = {}


def _nothing(parser: str | None):
    """A rule set of `parser` that passes no request (one per parser, shared)."""
    name = parser or "http"
    found = _NOTHING.get(name)
    if found is None:
        kind = policies.KafkaRuleSet if name == "kafka" else policies.HttpRuleSet
        found = _NOTHING[name] = kind((), allow_all=False)
    return found


def connection_policy(agent, src_ip: str, dst_ip: str, dport: int) -> ConnPolicy:
    compiled = agent.compiled
    if compiled is None:  # nothing compiled (yet, or the stored set failed): fail closed
        src_id, src_labels, _ = agent.peer(src_ip)
        dst_id, dst_labels, _ = agent.peer(dst_ip)
        return ConnPolicy(
            L4Decision("deny", src_id, tuple(src_labels), "no compiled policy in the agent"),
            lambda: None,
            "INGRESS",
            src_id,
            dst_id,
            tuple(dst_labels),
        )
    peers, verdicts = _verdicts(compiled, agent, src_ip, dst_ip, dport)
    src_id, src_labels, dst_id, dst_labels, dst_ep = peers
    denied = [v for v, _ in verdicts if v.action == "deny"]
    redirects = [(v, d) for v, d in verdicts if v.action == "redirect"]
    if denied:
        action, reason = "deny", denied[0].reason
    elif redirects:
        action, reason = "redirect", "; ".join(v.reason for v, _ in redirects)
    else:
        action, reason = "allow", verdicts[0][0].reason if verdicts else "no policy for these peers"
    first = _rule_set(compiled, verdicts, None)
    parser = first.parser if first is not None else None

    # The answer for the CompiledPolicy in force, kept until the agent installs another (an
    # installed one is never changed in place): per request one identity check, and one Both
    # object per revision, so the verdict memo keyed by the rule-set object
    # (l7proxy/http1/verdicts.py) keeps its entries between requests. A new revision judges the
    # open connection again, from its peers' current identities: rule-set ids are content
    # hashes, so a changed rule is a new id and must not fall back to the captured set.
    memo: tuple = (compiled, first)

    def rules():
        nonlocal memo
        current = agent.compiled
        if current is memo[0]:
            return memo[1]
        if current is None:  # the agent lost its policy: pass nothing
            found = _nothing(parser)
        else:
            found = _rule_set(current, _verdicts(current, agent, src_ip, dst_ip, dport)[1], parser)
        memo = (current, found)
        return found

    direction = (
        "INGRESS"
        if dst_ep is not None and (not redirects or redirects[-1][1] == policies.INGRESS)
        else "EGRESS"
    )
    return ConnPolicy(
        L4Decision(action, src_id, tuple(src_labels), reason),
        rules,
        direction,
        src_id,
        dst_id,
        tuple(dst_labels),
    )
