"""Cilium's policy semantics, one test per line of the issue."""

import policies as P

from .helpers import World, labels

EPS = {
    "web": "k8s:app=web",
    "db": "k8s:app=db",
    "cli": "k8s:app=cli",
    "other-ns": "k8s:app=cli,k8s:io.kubernetes.pod.namespace=prod",
}


def cnp(spec: str, name: str = "p", namespace: str = "default", kind: str = "CiliumNetworkPolicy"):
    ns = f"\n  namespace: {namespace}" if namespace else ""
    body = "\n".join("  " + line for line in spec.strip("\n").splitlines())
    return f"apiVersion: cilium.io/v2\nkind: {kind}\nmetadata:\n  name: {name}{ns}\nspec:\n{body}\n"


def test_ingress_section_enables_default_deny_only_for_selected_endpoints():
    w = World(cnp("endpointSelector: {matchLabels: {app: db}}\ningress:\n- {}"), EPS)
    assert w.compiled.endpoints["db"].ingress_enforced
    assert not w.compiled.endpoints["db"].egress_enforced
    assert w.action("db", "web", 5432) == "deny"
    assert w.action("web", "db", 80) == "allow"  # web is not selected


def test_ingress_deny_section_also_enables_default_deny():
    w = World(
        cnp(
            "endpointSelector: {matchLabels: {app: db}}\ningressDeny:\n- fromEndpoints: [{matchLabels: {app: cli}}]"
        ),
        EPS,
    )
    assert w.compiled.endpoints["db"].ingress_enforced
    assert w.action("db", "web", 1) == "deny"


def test_enable_default_deny_false_opts_out_but_deny_still_applies():
    spec = """
endpointSelector: {matchLabels: {app: db}}
enableDefaultDeny: {egress: false}
egressDeny:
- toEndpoints: [{matchLabels: {app: web}}]
"""
    w = World(cnp(spec), EPS)
    ep = w.compiled.endpoints["db"]
    assert not ep.egress_enforced
    assert w.action("db", "web", 80, direction=P.EGRESS) == "deny"
    assert w.action("db", "cli", 80, direction=P.EGRESS) == "allow"


def test_deny_wins_over_allow_even_when_allow_is_more_specific():
    spec = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: web}}]
  toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
ingressDeny:
- toPorts: [{ports: [{port: "5432", protocol: TCP}]}]
"""
    w = World(cnp(spec), EPS)
    assert w.action("db", "web", 5432) == "deny"
    # the map itself carries the deny on the most specific key (what the BPF side looks up)
    ms = w.compiled.endpoints["db"].map_state
    key = P.PolicyKey(w.id("web"), P.INGRESS, 6, 5432, 16)
    assert ms[key].deny


def test_allows_are_a_union_across_rules():
    a = cnp(
        "endpointSelector: {matchLabels: {app: db}}\ningress:\n- fromEndpoints: [{matchLabels: {app: web}}]",
        "a",
    )
    b = cnp(
        "endpointSelector: {matchLabels: {app: db}}\ningress:\n- fromEndpoints: [{matchLabels: {app: cli}}]\n  toPorts: [{ports: [{port: '22'}]}]",
        "b",
    )
    w = World(a + "---\n" + b, EPS)
    assert w.action("db", "web", 1234) == "allow"
    assert w.action("db", "cli", 22) == "allow"
    assert w.action("db", "cli", 23) == "deny"


def http_rule(peer: str, rules: str, port: str = "80") -> str:
    return f"""
- fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]
  toPorts:
  - ports: [{{port: "{port}", protocol: TCP}}]
    rules:
      http: {rules}
"""


def test_l7_rules_on_same_port_and_peer_are_unioned():
    spec = (
        "endpointSelector: {matchLabels: {app: db}}\ningress:"
        + http_rule("web", "[{method: GET, path: /a}]")
        + http_rule("web", "[{method: POST, path: /b}]")
    )
    w = World(cnp(spec), EPS)
    rs = w.rule_set("db", "web", 80)
    assert rs.check("GET", "/a", "", []).allowed
    assert rs.check("POST", "/b", "", []).allowed
    assert not rs.check("GET", "/b", "", []).allowed


def test_plain_l4_allow_for_same_peer_adds_allow_all_but_still_redirects():
    spec = (
        "endpointSelector: {matchLabels: {app: db}}\ningress:"
        + http_rule("web", "[{method: GET, path: /a}]")
        + """
- fromEndpoints: [{matchLabels: {app: web}}]
  toPorts: [{ports: [{port: "80", protocol: TCP}]}]
"""
    )
    w = World(cnp(spec), EPS)
    rs = w.rule_set("db", "web", 80)
    assert rs.allow_all and rs.check("DELETE", "/anything", "", []).allowed


def test_wildcard_peer_l7_rules_apply_to_specific_peer_too():
    spec = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- toPorts:
  - ports: [{port: "80", protocol: TCP}]
    rules: {http: [{method: GET, path: /public}]}
- fromEndpoints: [{matchLabels: {app: web}}]
  toPorts:
  - ports: [{port: "80", protocol: TCP}]
    rules: {http: [{method: POST, path: /admin}]}
"""
    w = World(cnp(spec), EPS)
    web = w.rule_set("db", "web", 80)
    assert (
        web.check("GET", "/public", "", []).allowed and web.check("POST", "/admin", "", []).allowed
    )
    cli = w.rule_set("db", "cli", 80)
    assert (
        cli.check("GET", "/public", "", []).allowed
        and not cli.check("POST", "/admin", "", []).allowed
    )


def test_specific_plain_allow_under_wildcard_l7_is_redirected_with_allow_all():
    spec = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- toPorts:
  - ports: [{port: "80", protocol: TCP}]
    rules: {http: [{method: GET, path: /public}]}
- fromEndpoints: [{matchLabels: {app: web}}]
"""
    w = World(cnp(spec), EPS)
    rs = w.rule_set("db", "web", 80)
    assert rs.allow_all
    assert w.action("db", "web", 81) == "allow"
    assert not w.rule_set("db", "cli", 80).allow_all


def test_two_parser_types_on_one_port_is_a_validation_error():
    from .helpers import load

    spec = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- toPorts:
  - ports: [{port: "80", protocol: TCP}]
    rules: {http: [{method: GET}]}
- toPorts:
  - ports: [{port: "80", protocol: TCP}]
    rules: {kafka: [{role: produce}]}
"""
    result = load(cnp(spec))
    assert not result.ok
    assert any("two L7 parser types" in d.reason for d in result.errors)
    both = load(
        cnp(
            "endpointSelector: {}\ningress:\n- toPorts:\n  - ports: [{port: '80'}]\n    rules: {http: [{}], kafka: [{}]}"
        )
    )
    assert any("two L7 parser types" in d.reason for d in both.errors)


def test_namespaced_policy_selects_and_peers_only_in_its_namespace():
    spec = "endpointSelector: {matchLabels: {app: cli}}\ningress:\n- fromEndpoints: [{matchLabels: {app: web}}]"
    w = World(
        cnp(spec, namespace="prod"),
        {**EPS, "web-prod": "k8s:app=web,k8s:io.kubernetes.pod.namespace=prod"},
    )
    assert w.compiled.endpoints["other-ns"].ingress_enforced
    assert not w.compiled.endpoints["cli"].ingress_enforced  # cli in default is not selected
    assert w.action("other-ns", "web-prod", 80) == "allow"
    assert w.action("other-ns", "web", 80) == "deny"  # web lives in default


def test_explicit_namespace_label_in_peer_crosses_namespaces():
    spec = "endpointSelector: {matchLabels: {app: cli}}\ningress:\n- fromEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: default, app: web}}]"
    w = World(cnp(spec, namespace="prod"), EPS)
    assert w.action("other-ns", "web", 80) == "allow"


def test_clusterwide_policy_is_not_scoped():
    spec = "endpointSelector: {matchLabels: {app: cli}}\ningress:\n- fromEndpoints: [{matchLabels: {app: web}}]"
    w = World(
        cnp(spec, namespace="", kind="CiliumClusterwideNetworkPolicy"),
        {**EPS, "web-prod": "k8s:app=web,k8s:io.kubernetes.pod.namespace=prod"},
    )
    assert (
        w.compiled.endpoints["cli"].ingress_enforced
        and w.compiled.endpoints["other-ns"].ingress_enforced
    )
    assert w.action("other-ns", "web", 80) == "allow"
    assert w.action("cli", "web-prod", 80) == "allow"
    assert w.action("cli", P.WORLD, 80) == "deny"


def test_selector_without_source_matches_any_source():
    sel = (
        P.Selector((P.labels.Requirement("", "app", "In", ("web",)),))
        if hasattr(P, "labels")
        else None
    )
    from policies.labels import Requirement, Selector

    sel = Selector((Requirement("", "app", "In", ("web",)),))
    assert sel.matches(P.parse_labels("k8s:app=web")) and sel.matches(
        P.parse_labels("container:app=web")
    )
    k8s_only = Selector((Requirement("k8s", "app", "In", ("web",)),))
    assert not k8s_only.matches(P.parse_labels("container:app=web"))
    assert k8s_only.matches(P.parse_labels("app=web"))  # a label typed without source


def test_match_expressions_operators():
    from policies.labels import Requirement

    ls = P.parse_labels("k8s:app=web,k8s:tier=front")
    assert Requirement("", "app", "In", ("web", "db")).matches(ls)
    assert not Requirement("", "app", "NotIn", ("web",)).matches(ls)
    assert Requirement("", "zone", "NotIn", ("a",)).matches(ls)
    assert Requirement("", "tier", "Exists").matches(ls)
    assert Requirement("", "zone", "DoesNotExist").matches(ls)


def test_entities_world_cluster_host_and_all():
    spec = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEntities: [world]
  toPorts: [{ports: [{port: "1"}]}]
- fromEntities: [cluster]
  toPorts: [{ports: [{port: "2"}]}]
- fromEntities: [host, remote-node]
  toPorts: [{ports: [{port: "3"}]}]
- fromEntities: [all]
  toPorts: [{ports: [{port: "4"}]}]
"""
    w = World(cnp(spec), EPS)
    assert w.action("db", P.WORLD, 1) == "allow" and w.action("db", "web", 1) == "deny"
    assert w.action("db", "web", 2) == "allow" and w.action("db", P.HOST, 2) == "allow"
    assert w.action("db", P.WORLD, 2) == "deny"
    assert w.action("db", P.HOST, 3) == "allow" and w.action("db", P.REMOTE_NODE, 3) == "allow"
    assert w.action("db", P.WORLD, 3) == "deny"
    assert all(w.action("db", peer, 4) == "allow" for peer in (P.WORLD, P.HOST, w.id("web")))


def test_cidr_and_cidrset_with_except_use_local_identities_and_longest_prefix():
    spec = """
endpointSelector: {matchLabels: {app: db}}
egress:
- toCIDR: [20.1.1.1/32]
- toCIDRSet:
  - cidr: 10.0.0.0/8
    except: [10.96.0.0/12]
"""
    w = World(cnp(spec), EPS)
    lookup = w.ipcache.lookup
    assert lookup("20.1.1.1") >= P.LOCAL_SCOPE
    assert w.action("db", lookup("20.1.1.1"), 443, direction=P.EGRESS) == "allow"
    assert w.action("db", lookup("10.1.2.3"), 443, direction=P.EGRESS) == "allow"
    assert w.action("db", lookup("10.96.0.1"), 443, direction=P.EGRESS) == "deny"
    assert lookup("8.8.8.8") == P.WORLD
    assert w.action("db", lookup("8.8.8.8"), 443, direction=P.EGRESS) == "deny"


def test_world_entity_covers_cidr_identities():
    spec = "endpointSelector: {matchLabels: {app: db}}\negress:\n- toEntities: [world]\n- toCIDR: [192.0.2.0/24]\n  toPorts: [{ports: [{port: '22'}]}]"
    w = World(cnp(spec), EPS)
    assert w.action("db", w.ipcache.lookup("192.0.2.9"), 80, direction=P.EGRESS) == "allow"


def test_port_ranges_become_port_prefixes():
    from policies.mapstate import port_prefixes

    assert port_prefixes(80, 80) == [(80, 16)]
    assert port_prefixes(0, 65535) == [(0, 0)]
    assert port_prefixes(80, 83) == [(80, 14)]
    blocks = port_prefixes(80, 444)
    covered = set()
    for port, plen in blocks:
        covered |= set(range(port, port + (1 << (16 - plen))))
    assert covered == set(range(80, 445))
    w = World(
        cnp(
            "endpointSelector: {matchLabels: {app: db}}\negress:\n- toPorts: [{ports: [{port: '80', endPort: 444, protocol: TCP}]}]"
        ),
        EPS,
    )
    assert w.action("db", "web", 80, direction=P.EGRESS) == "allow"
    assert w.action("db", "web", 444, direction=P.EGRESS) == "allow"
    assert w.action("db", "web", 445, direction=P.EGRESS) == "deny"
    assert w.action("db", "web", 79, direction=P.EGRESS) == "deny"


def test_protocol_any_expands_to_tcp_udp_sctp_and_udp_only_is_udp():
    w = World(
        cnp(
            "endpointSelector: {matchLabels: {app: db}}\ningress:\n- toPorts: [{ports: [{port: '53', protocol: UDP}]}]\n- toPorts: [{ports: [{port: '99'}]}]"
        ),
        EPS,
    )
    assert w.action("db", "web", 53, proto=17) == "allow"
    assert w.action("db", "web", 53, proto=6) == "deny"
    assert all(w.action("db", "web", 99, proto=p) == "allow" for p in (6, 17, 132))


def test_icmp_types():
    w = World(
        cnp(
            "endpointSelector: {matchLabels: {app: db}}\negress:\n- icmps: [{fields: [{type: 8, family: IPv4}, {type: EchoRequest, family: IPv6}]}]"
        ),
        EPS,
    )
    assert w.action("db", "web", 8, proto=1, direction=P.EGRESS) == "allow"
    assert w.action("db", "web", 0, proto=1, direction=P.EGRESS) == "deny"
    assert w.action("db", "web", 128, proto=58, direction=P.EGRESS) == "allow"


def test_from_requires_is_anded_into_from_endpoints():
    spec = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromRequires: [{matchLabels: {env: prod}}]
- fromEndpoints: [{matchLabels: {role: client}}]
"""
    eps = {
        "db": "k8s:app=db",
        "a": "k8s:role=client,k8s:env=prod",
        "b": "k8s:role=client,k8s:env=dev",
    }
    w = World(cnp(spec), eps) if False else None
    from .helpers import load

    result = load(cnp(spec))
    assert result.ok and any(d.field.endswith("fromRequires") for d in result.diagnostics)
    w = World(result.rules, eps)
    assert w.action("db", "a", 80) == "allow"
    assert w.action("db", "b", 80) == "deny"


def test_named_ports_resolve_against_endpoint_ports():
    from .helpers import rules

    rs = rules(
        cnp(
            "endpointSelector: {matchLabels: {app: db}}\ningress:\n- toPorts: [{ports: [{port: http-alt, protocol: TCP}]}]"
        )
    )
    alloc, cache = P.IdentityAllocator(), P.IPCache()
    eps = {"db": labels("k8s:app=db"), "web": labels("k8s:app=web")}
    c = P.compile_policy(rs, eps, alloc, cache, 1, named_ports={"db": {"http-alt": 8080}})
    web = c.endpoints["web"].identity
    assert P.l4_verdict(c, "db", web, P.INGRESS, 6, 8080).action == "allow"
    assert P.l4_verdict(c, "db", web, P.INGRESS, 6, 80).action == "deny"
    c2 = P.compile_policy(rs, eps, alloc, cache, 2)
    assert P.l4_verdict(c2, "db", web, P.INGRESS, 6, 8080).action == "deny"
    assert any("named port 'http-alt'" in d.reason for d in c2.diagnostics)


def test_diff_gives_adds_and_deletes_for_one_rule_change():
    base = cnp(
        "endpointSelector: {matchLabels: {app: db}}\ningress:\n- fromEndpoints: [{matchLabels: {app: web}}]\n  toPorts: [{ports: [{port: '5432', protocol: TCP}]}]"
    )
    changed = base.replace("5432", "5433")
    a = World(base, EPS, revision=1)
    from .helpers import rules

    b = P.compile_policy(rules(changed), a.endpoints, a.allocator, a.ipcache, 2)
    d = P.diff(a.compiled, b)
    assert set(d) == {"db"}
    web = a.id("web")
    assert d["db"].deletes == (P.PolicyKey(web, P.INGRESS, 6, 5432, 16),)
    assert list(d["db"].adds) == [P.PolicyKey(web, P.INGRESS, 6, 5433, 16)]
    assert P.diff(b, b) == {}
    first = P.diff(None, a.compiled)
    assert set(first) == {"db"} and not first["db"].deletes


def test_kubernetes_network_policy_v1():
    text = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np, namespace: default}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {matchLabels: {app: web}}
    - namespaceSelector: {matchLabels: {team: ops}}
    - ipBlock: {cidr: 192.0.2.0/24, except: [192.0.2.128/25]}
    ports:
    - port: 5432
  egress: []
"""
    eps = {
        **EPS,
        "ops": "k8s:app=x,k8s:io.kubernetes.pod.namespace=ops,k8s:io.cilium.k8s.namespace.labels.team=ops",
    }
    w = World(text, eps)
    ep = w.compiled.endpoints["db"]
    assert ep.ingress_enforced and ep.egress_enforced
    assert w.action("db", "web", 5432) == "allow"
    assert w.action("db", "web", 5432, proto=17) == "deny"  # default protocol TCP
    assert w.action("db", "cli", 5432) == "deny"
    assert w.action("db", "ops", 5432) == "allow"
    assert w.action("db", w.ipcache.lookup("192.0.2.1"), 5432) == "allow"
    assert w.action("db", w.ipcache.lookup("192.0.2.200"), 5432) == "deny"
    assert w.action("db", "web", 80, direction=P.EGRESS) == "deny"


def test_network_policy_rule_without_from_allows_everyone():
    text = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: np}
spec:
  podSelector: {}
  ingress:
  - ports: [{port: 80}]
"""
    w = World(text, EPS)
    assert w.action("db", P.WORLD, 80) == "allow" and w.action("db", P.WORLD, 81) == "deny"


def test_parser_clash_across_policies_with_the_same_selector_is_an_error():
    from .helpers import load

    a = cnp(
        "endpointSelector: {matchLabels: {app: db}}\ningress:\n- toPorts:\n  - ports: [{port: '8000', endPort: 8010, protocol: TCP}]\n    rules: {http: [{method: GET}]}",
        "a",
    )
    b = cnp(
        "endpointSelector: {matchLabels: {app: db}}\ningress:\n- fromEndpoints: [{}]\n  toPorts:\n  - ports: [{port: '8005', protocol: TCP}]\n    rules: {kafka: [{role: produce}]}",
        "b",
    )
    result = load(a + "---\n" + b)
    (err,) = result.errors
    assert err.line == 21 and err.field == "spec.ingress[0].toPorts"
    assert "two L7 parser types (http and kafka) (other rule: default/a)" in err.reason
    other_port = load(a + "---\n" + b.replace("8005", "9000"))
    assert other_port.ok


def test_parser_clash_between_differently_selected_policies_is_denied_at_compile_time():
    a = cnp(
        "endpointSelector: {matchLabels: {app: db}}\ningress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n    rules: {http: [{}]}",
        "a",
    )
    b = cnp(
        "endpointSelector: {matchExpressions: [{key: app, operator: Exists}]}\ningress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n    rules: {kafka: [{}]}",
        "b",
    )
    w = World(a + "---\n" + b, EPS)
    assert w.action("db", "web", 80) == "deny"
    assert any("conflict" in d.reason for d in w.compiled.diagnostics)
    assert w.action("web", "db", 80) == "redirect"  # web only has the kafka rule


def test_l7_rules_need_a_tcp_port():
    from .helpers import load

    udp = load(
        cnp(
            "endpointSelector: {}\ningress:\n- toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n    rules: {http: [{}]}"
        )
    )
    assert [d.reason for d in udp.errors] == ["http rules apply to TCP, not UDP"]
    # no protocol means ANY, which Cilium's sanitizer refuses for L7 rules (it was a warning here
    # and compiled as TCP only before issue 19)
    anyp = load(
        cnp(
            "endpointSelector: {}\ningress:\n- toPorts:\n  - ports: [{port: '80'}]\n    rules: {http: [{}]}"
        )
    )
    assert [d.reason for d in anyp.errors] == [
        "http rules apply to TCP, not ANY: write protocol: TCP (Cilium refuses L7 rules on ANY too)"
    ]
    tcp = load(
        cnp(
            "endpointSelector: {}\ningress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n    rules: {http: [{}]}"
        )
    )
    w = World(tcp.rules, EPS)
    assert (
        w.action("db", "web", 80, proto=6) == "redirect"
        and w.action("db", "web", 80, proto=17) == "deny"
    )


def test_host_policy_with_node_selector_selects_the_host_endpoint_only():
    spec = "nodeSelector: {}\ningress:\n- fromEntities: [cluster]\n  toPorts: [{ports: [{port: '22', protocol: TCP}]}]"
    w = World(
        cnp(spec, namespace="", kind="CiliumClusterwideNetworkPolicy"),
        {**EPS, "node": "reserved:host"},
    )
    assert w.compiled.endpoints["node"].ingress_enforced
    assert not w.compiled.endpoints["web"].ingress_enforced
    assert w.action("node", "web", 22) == "allow" and w.action("node", P.WORLD, 22) == "deny"


def test_ipv6_cidr_rules():
    spec = "endpointSelector: {matchLabels: {app: db}}\negress:\n- toCIDRSet: [{cidr: 'fd00::/16', except: ['fd00:1::/32']}]"
    w = World(cnp(spec), EPS)
    assert w.action("db", w.ipcache.lookup("fd00:2::1"), 80, direction=P.EGRESS) == "allow"
    assert w.action("db", w.ipcache.lookup("fd00:1::1"), 80, direction=P.EGRESS) == "deny"
    assert w.action("db", w.ipcache.lookup("2001:db8::1"), 80, direction=P.EGRESS) == "deny"


def test_world_deny_beats_all_entity_allow():
    spec = "endpointSelector: {}\ningressDeny:\n- fromEntities: [world]\ningress:\n- fromEntities: [all]"
    w = World(cnp(spec, namespace="", kind="CiliumClusterwideNetworkPolicy"), EPS)
    assert w.action("db", P.WORLD, 80) == "deny"
    assert w.action("db", "web", 80) == "allow"
    assert w.action("db", P.HOST, 80) == "allow"


def test_empty_rule_selects_nobody_but_enables_default_deny_for_egress():
    w = World(cnp("endpointSelector: {matchLabels: {app: db}}\negress:\n- {}"), EPS)
    assert w.compiled.endpoints["db"].egress_enforced
    assert w.action("db", "web", 53, proto=17, direction=P.EGRESS) == "deny"
    assert len(w.compiled.endpoints["db"].map_state) == 0


def test_most_specific_key_alone_gives_the_same_answer_as_the_lookup():
    """The BPF side does a most-specific lookup; compile writes denies where they must win."""
    import itertools

    spec = """
endpointSelector: {matchLabels: {app: db}}
ingress:
- fromEndpoints: [{matchLabels: {app: web}}]
- toPorts: [{ports: [{port: '80', endPort: 90, protocol: TCP}]}]
- fromEndpoints: [{matchLabels: {app: cli}}]
  toPorts:
  - ports: [{port: '85', protocol: TCP}]
    rules: {http: [{method: GET}]}
ingressDeny:
- toPorts: [{ports: [{port: '84', endPort: 86}]}]
- fromEndpoints: [{matchLabels: {app: web}}]
  toPorts: [{ports: [{port: '443', protocol: TCP}]}]
"""
    w = World(cnp(spec), EPS)
    ms = w.compiled.endpoints["db"].map_state
    for peer, port, proto in itertools.product(
        [w.id("web"), w.id("cli"), P.WORLD], [22, 80, 84, 85, 86, 90, 91, 443], [6, 17]
    ):
        keys = ms.matches(peer, P.INGRESS, proto, port)
        best = max(keys, key=lambda k: (k.identity != 0, k.prefix_len, k.proto != 0), default=None)
        assert (ms[best] if best else None) == ms.lookup(peer, P.INGRESS, proto, port), (
            peer,
            port,
            proto,
        )
    assert w.action("db", "web", 85) == "deny" and w.action("db", "web", 443) == "deny"
    assert w.action("db", "web", 444) == "allow" and w.action("db", "cli", 80) == "allow"


def test_from_nodes_selects_the_host_by_its_node_labels():
    spec = "endpointSelector: {matchLabels: {app: db}}\ningress:\n- fromNodes: [{matchLabels: {node-role: infra}}]"
    w = World(cnp(spec), {**EPS, "node": "reserved:host,k8s:node-role=infra"})
    assert w.action("db", P.HOST, 22) == "allow"
    assert w.action("db", P.REMOTE_NODE, 22) == "deny"
    other = World(cnp(spec), {**EPS, "node": "reserved:host,k8s:node-role=edge"})
    assert other.action("db", P.HOST, 22) == "deny"
    anynode = World(
        cnp("endpointSelector: {matchLabels: {app: db}}\ningress:\n- fromNodes: [{}]"), EPS
    )
    assert (
        anynode.action("db", P.HOST, 1) == "allow"
        and anynode.action("db", P.REMOTE_NODE, 1) == "allow"
    )
