"""The node proxy's rules per connection (l7proxy/agent/connection_rules.py): the egress and
ingress rule sets ANDed, answered from a memo that a newly installed policy replaces."""

from __future__ import annotations

import policies as P
from l7proxy.agent.connection_rules import Both, connection_policy
from tests.unit.policies.helpers import World

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules: {http: [{method: GET, path: "/public/.*"}]}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: client}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints: [{matchLabels: {app: web}}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
          rules: {http: [{method: GET, path: "/.*"}]}
"""
ENDPOINTS = {"web": "k8s:app=web", "client": "k8s:app=client"}


class Agent:
    """What connection_policy reads of the agent: peers by address and the policy in force."""

    def __init__(self, world: World) -> None:
        self.compiled = world.compiled
        self.ips = {"10.0.0.2": "client", "10.0.0.3": "web"}
        self.world = world

    def peer(self, ip: str):
        name = self.ips[ip]
        return self.world.id(name), [str(lb) for lb in self.world.endpoints[name]], name


def allowed(rules, path: str) -> bool:
    return rules.check("GET", path, "web", []).allowed


def test_both_sides_apply_and_a_newly_installed_policy_is_read_at_the_next_request():
    world = World(POLICY, ENDPOINTS)
    agent = Agent(world)
    cp = connection_policy(agent, "10.0.0.2", "10.0.0.3", 80)
    assert cp.decision.action == "redirect"
    first = cp.rules()
    assert isinstance(first, Both) and cp.rules() is first  # one object per installed policy
    assert allowed(first, "/public/a") and not allowed(first, "/private/x")
    # The agent installs a recompiled policy: the next request reads its rule sets.
    again = P.compile_policy(world.rules, world.endpoints, world.allocator, world.ipcache, 2)
    assert again is not world.compiled
    agent.compiled = again
    second = cp.rules()
    assert second is not first and {id(second.first), id(second.second)} <= {
        id(s) for s in again.l7.values()
    }
    assert allowed(second, "/public/a") and not allowed(second, "/private/x")


TIGHTER = POLICY.replace('path: "/public/.*"', 'path: "/public/only"')


def test_an_open_connection_meets_a_tightened_rule_and_a_denied_port_at_its_next_request():
    """Rule-set ids are content hashes: a changed rule is a new id, and an open keep-alive
    connection must not keep the set it captured at connect time."""
    world = World(POLICY, ENDPOINTS)
    agent = Agent(world)
    cp = connection_policy(agent, "10.0.0.2", "10.0.0.3", 80)
    assert allowed(cp.rules(), "/public/a")
    tight = World(TIGHTER, ENDPOINTS)
    agent.compiled, agent.world = tight.compiled, tight
    rules = cp.rules()
    assert not allowed(rules, "/public/a") and allowed(rules, "/public/only")
    # The web policy's ingress rule is gone: the client's egress L7 rules alone apply.
    loose = World(POLICY.split("---")[1], ENDPOINTS)
    agent.compiled, agent.world = loose.compiled, loose
    assert allowed(cp.rules(), "/private/x")
    # No policy lets the client reach web on 80 any more: nothing passes.
    only_web = World(POLICY.split("---")[0].replace('port: "80"', 'port: "81"'), ENDPOINTS)
    agent.compiled, agent.world = only_web.compiled, only_web
    assert not allowed(cp.rules(), "/public/a")
    # The agent lost its policy: nothing passes.
    agent.compiled = None
    assert not allowed(cp.rules(), "/public/a")
