"""Which L7 rules apply to one proxied connection, from the agent's live state (the node and
sidecar proxies ask per connection; the gateway's one-endpoint counterpart is gateway_policy.py).

A connection between two peers can meet L7 rules twice: the source endpoint's egress policy and
the destination endpoint's ingress policy. Cilium applies both; so does `Both`, which passes a
request only when each side's rule set passes it. Rules are re-read from the agent's current
CompiledPolicy on every request, so a new revision applies to the next request.
"""

from __future__ import annotations

from dataclasses import dataclass

import policies
from l7proxy.listener_decision import L4Decision

PROTO_TCP = 6
_UNSET = object()  # no CompiledPolicy looked at yet


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


def connection_policy(agent, src_ip: str, dst_ip: str, dport: int) -> ConnPolicy:
    src_id, src_labels, src_ep = agent.peer(src_ip)
    dst_id, dst_labels, dst_ep = agent.peer(dst_ip)
    compiled = agent.compiled
    if compiled is None:  # nothing compiled (yet, or the stored set failed): fail closed
        return ConnPolicy(
            L4Decision("deny", src_id, tuple(src_labels), "no compiled policy in the agent"),
            lambda: None,
            "INGRESS",
            src_id,
            dst_id,
            tuple(dst_labels),
        )
    sides = []  # (endpoint, peer identity, direction)
    if src_ep is not None:
        sides.append((src_ep, dst_id, policies.EGRESS))
    if dst_ep is not None:
        sides.append((dst_ep, src_id, policies.INGRESS))
    verdicts = []
    for ep, peer, direction in sides:
        if compiled is not None:
            verdicts.append(
                (policies.l4_verdict(compiled, ep, peer, direction, PROTO_TCP, dport), direction)
            )
    denied = [v for v, _ in verdicts if v.action == "deny"]
    redirects = [(v, d) for v, d in verdicts if v.action == "redirect"]
    if denied:
        action, reason = "deny", denied[0].reason
    elif redirects:
        action, reason = "redirect", "; ".join(v.reason for v, _ in redirects)
    else:
        action, reason = "allow", verdicts[0][0].reason if verdicts else "no policy for these peers"
    l7_ids = tuple(v.l7_id for v, _ in redirects)
    captured = tuple(compiled.l7.get(i) for i in l7_ids) if compiled is not None else ()

    # The answer for the CompiledPolicy in force, kept until the agent installs another (an
    # installed one is never changed in place): per request one identity check instead of
    # rebuilding the list, and one Both object per revision, so the verdict memo that is keyed
    # by the rule-set object (l7proxy/http1/verdicts.py) keeps its entries between requests.
    memo: tuple = (_UNSET, None)

    def rules():
        nonlocal memo
        current = agent.compiled
        if current is memo[0]:
            return memo[1]
        sets = [
            current.l7.get(i, old) if current is not None else old
            for i, old in zip(l7_ids, captured, strict=True)
        ]
        sets = [s for s in sets if s is not None]
        if not sets:
            found = None
        elif len(sets) == 2 and sets[0].parser == sets[1].parser:
            found = Both(sets[0], sets[1])
        else:
            found = sets[0]
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
