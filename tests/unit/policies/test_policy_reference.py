"""Randomized check of the compiled MapState against a direct reading of the rules.

The reference evaluator below applies Cilium's semantics straight from the rules (deny wins, allows
are a union, L7 rules of every matching allow are unioned, a matching plain allow lets every
request through). The compiled path (`l4_verdict` + the L7 rule set) must agree on every flow.
"""

import random

import policies as P
from policies.compile import port_keys
from policies.model import PortProto
from policies.selection import selects
from policies.selectors import Universe

from .helpers import labels

APPS = ("a", "b", "c")
PORTS = [
    "{port: '80', protocol: TCP}",
    "{port: '81'}",
    "{port: '80', endPort: 83, protocol: TCP}",
    "{port: '443', protocol: UDP}",
    "{port: '0', protocol: TCP}",
]
HTTP = ["{method: GET, path: /a}", "{method: POST}", "{path: '/b.*'}"]
REQUESTS = [("GET", "/a"), ("POST", "/b"), ("PUT", "/bx"), ("GET", "/c")]
FLOWS = [(port, proto) for port in (22, 80, 81, 82, 443) for proto in (6, 17)]


def peer(rng, direction):
    prefix = "from" if direction == "in" else "to"
    kind = rng.randrange(4)
    if kind == 0:
        return ""  # L3 wildcard
    if kind == 1:
        return f"  {prefix}Entities: [{rng.choice(['world', 'all', 'cluster'])}]\n"
    return f"  {prefix}Endpoints: [{{matchLabels: {{app: {rng.choice(APPS)}}}}}]\n"


def peer_rule(rng, direction, deny):
    text = peer(rng, direction)
    ports = rng.sample(PORTS, rng.randrange(0, 3))
    if not text and not ports:
        ports = [PORTS[0]]
    if ports:
        l7 = ""
        tcp = [p for p in ports if "UDP" not in p and "'0'" not in p]
        if not deny and tcp and rng.random() < 0.5:
            ports = [p if "protocol" in p else p.replace("}", ", protocol: TCP}") for p in tcp]
            rules = ", ".join(rng.sample(HTTP, rng.randrange(1, 3)))
            l7 = f"\n    rules: {{http: [{rules}]}}"
        text += f"  toPorts:\n  - ports: [{', '.join(ports)}]{l7}\n"
    return "-" + text[1:]


def policy(rng, n):
    docs = []
    for i in range(n):
        direction = rng.choice(["in", "out"])
        key = "ingress" if direction == "in" else "egress"
        body = f"apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{i}}}\nspec:\n"
        body += f"  endpointSelector: {{matchLabels: {{app: {rng.choice(APPS)}}}}}\n"
        if rng.random() < 0.2:
            body += f"  enableDefaultDeny: {{{key}: false}}\n"
        for section, deny in ((key, False), (f"{key}Deny", True)):
            count = rng.randrange(0, 3) if deny else rng.randrange(1, 4)
            if count:
                body += f"  {section}:\n"
                for _ in range(count):
                    body += (
                        "\n".join(
                            "  " + line for line in peer_rule(rng, direction, deny).splitlines()
                        )
                        + "\n"
                    )
        docs.append(body)
    return "---\n".join(docs)


def l4_matches(pr, proto, port):
    if pr.icmps:
        return False
    if not pr.ports:
        return True
    for port_rule in pr.ports:
        for pp in port_rule.ports or (PortProto(0, 0, 0),):
            for kproto, kport, plen in port_keys(pp):
                shift = 16 - plen
                if kproto in (0, proto) and (port >> shift) == (kport >> shift):
                    yield_rule = port_rule
                    return yield_rule
    return False


def reference(rules, universe, subject_labels, direction, peer_id, proto, port, request):
    """(action, request allowed or None when not redirected)."""
    selecting = [r for r in rules if selects(r, subject_labels)]
    enforced = any(
        (r.has_ingress and r.default_deny_ingress)
        if direction == P.INGRESS
        else (r.has_egress and r.default_deny_egress)
        for r in selecting
    )
    plain = False
    l7_rules = []
    any_allow = False
    for rule in selecting:
        allow, deny = rule.sections(direction)
        for pr in deny:
            ids = universe.resolve(pr.peers)
            if (0 in ids or peer_id in ids) and l4_matches(pr, proto, port):
                return "deny", None
        for pr in allow:
            ids = universe.resolve(pr.peers)
            if not (0 in ids or peer_id in ids):
                continue
            match = l4_matches(pr, proto, port)
            if match is False:
                continue
            any_allow = True
            if match is True or match.l7 is None:
                plain = True
            else:
                l7_rules.extend(match.l7.rules)
    if l7_rules:
        if plain:
            return "redirect", True
        from policies.l7 import HttpRuleSet

        return "redirect", HttpRuleSet(l7_rules).check(request[0], request[1], "", ()).allowed
    if any_allow or not enforced:
        return "allow", None
    return "deny", None


def test_compiled_policy_agrees_with_direct_rule_evaluation():
    eps_spec = {f"ep-{app}": f"k8s:app={app}" for app in APPS}
    checked = 0
    for seed in range(150):
        rng = random.Random(seed)
        text = policy(rng, rng.randrange(1, 4))
        result = P.load_text(text, f"seed{seed}.yaml")
        assert result.ok, (seed, [str(d) for d in result.errors], text)
        eps = {name: labels(spec) for name, spec in eps_spec.items()}
        alloc, cache = P.IdentityAllocator(), P.IPCache()
        compiled = P.compile_policy(result.rules, eps, alloc, cache, 1)
        universe = Universe(alloc.identities())
        peers = [compiled.endpoints[n].identity for n in eps] + [P.WORLD, P.HOST]
        for name in eps:
            for direction in (P.INGRESS, P.EGRESS):
                for peer_id in peers:
                    for port, proto in FLOWS:
                        v = P.l4_verdict(compiled, name, peer_id, direction, proto, port)
                        # what a plain most-specific-key lookup (the BPF side) finds is the same
                        ms = compiled.endpoints[name].map_state
                        keys = ms.matches(peer_id, direction, proto, port)
                        best = max(
                            keys,
                            key=lambda k: (k.identity != 0, k.prefix_len, k.proto != 0),
                            default=None,
                        )
                        assert (ms[best] if best else None) == v.entry, (
                            seed,
                            name,
                            peer_id,
                            port,
                            proto,
                        )
                        for request in REQUESTS:
                            want = reference(
                                result.rules,
                                universe,
                                eps[name],
                                direction,
                                peer_id,
                                proto,
                                port,
                                request,
                            )
                            got_allowed = None
                            if v.action == "redirect":
                                got_allowed = (
                                    compiled.l7[v.l7_id]
                                    .check(request[0], request[1], "", ())
                                    .allowed
                                )
                            assert (v.action, got_allowed) == want, (
                                seed,
                                name,
                                direction,
                                peer_id,
                                port,
                                proto,
                                request,
                                text,
                            )
                            checked += 1
    assert checked > 100_000
