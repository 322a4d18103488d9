"""What a listener learns about a connection when it accepts it (`Listener.classify`).

Two places build it from the one compiled policy: the gateway's policy (`gateway_policy.py`, one
protected endpoint, the peer's identity from `--peer`) and the agent's connection rules
(`agent/connection_rules.py`, both peers from the agent's endpoint table). The server's gate
reads it: deny closes the connection, allow and redirect go on to the protocol session.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class L4Decision:
    action: str  # "deny" | "allow" | "redirect"
    identity: int  # the source's
    labels: tuple[str, ...]  # the source's
    reason: str
