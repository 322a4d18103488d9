"""The core path the proxy and datapath rely on: load, identities, compile, lookup, L7 checks."""

import policies as P
from policies.trace import parse_peer, trace

from .helpers import World, labels, load, rules

SW = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: rule1
spec:
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: POST
          path: /v1/request-landing
"""
EPS = {
    "deathstar": "k8s:org=empire,k8s:class=deathstar",
    "tiefighter": "k8s:org=empire,k8s:class=tiefighter",
    "xwing": "k8s:org=alliance,k8s:class=xwing",
}


def test_star_wars_l7_policy_redirects_empire_and_drops_alliance():
    w = World(SW, EPS)
    assert w.action("deathstar", "tiefighter", 80) == "redirect"
    assert w.action("deathstar", "xwing", 80) == "deny"
    assert w.action("deathstar", "tiefighter", 81) == "deny"
    rs = w.rule_set("deathstar", "tiefighter", 80)
    assert rs.parser == "http" and not rs.allow_all
    assert rs.check("POST", "/v1/request-landing", "deathstar", []).allowed
    assert not rs.check("PUT", "/v1/exhaust-port", "deathstar", []).allowed
    assert not rs.check("POST", "/v1/request-landing/x", "deathstar", []).allowed


def test_unselected_endpoint_is_default_allow():
    w = World(SW, EPS)
    ep = w.compiled.endpoints["xwing"]
    assert not ep.ingress_enforced and not ep.egress_enforced and len(ep.map_state) == 0
    assert w.action("xwing", "tiefighter", 443) == "allow"
    assert w.action("deathstar", "tiefighter", 80, direction=P.EGRESS) == "allow"


def test_compile_is_deterministic_and_tagged_with_revision():
    a = World(SW, EPS, revision=7)
    b = World(SW, EPS, revision=7)
    assert a.compiled.revision == 7
    for name in EPS:
        assert a.compiled.endpoints[name].map_state == b.compiled.endpoints[name].map_state
    assert set(a.compiled.l7) == set(b.compiled.l7)


def test_identities_persist_across_restarts():
    a = P.IdentityAllocator()
    web = a.allocate(labels("app=web"))
    db = a.allocate(labels("app=db"))
    cidr = a.allocate_cidr("10.0.0.0/8")
    assert web >= 256 and db != web and cidr >= P.LOCAL_SCOPE
    b = P.IdentityAllocator(a.to_state())
    assert b.allocate(labels("app=db")) == db
    assert b.allocate(labels("app=web")) == web
    assert b.allocate_cidr("10.0.0.0/8") == cidr
    assert b.allocate(labels("app=new")) not in (web, db)
    assert b.labels_of(web) == a.labels_of(web)


def test_reserved_identities_have_cilium_numbers():
    assert (P.HOST, P.WORLD, P.UNMANAGED, P.HEALTH, P.INIT, P.REMOTE_NODE) == (1, 2, 3, 4, 5, 6)
    assert (P.KUBE_APISERVER, P.INGRESS_IDENTITY, P.WORLD_IPV4, P.WORLD_IPV6) == (7, 8, 9, 10)
    a = P.IdentityAllocator()
    assert a.allocate(P.parse_labels("reserved:host")) == P.HOST
    assert a.allocate(P.parse_labels("reserved:world")) == P.WORLD


def test_ipcache_longest_prefix_and_unknown_is_world():
    c = P.IPCache()
    c.upsert("10.0.0.0/8", 100)
    c.upsert("10.1.0.0/16", 200)
    c.upsert("10.1.2.3", 300)
    c.upsert("fd00::/64", 400)
    assert c.lookup("10.1.2.3") == 300
    assert c.lookup("10.1.9.9") == 200
    assert c.lookup("10.200.0.1") == 100
    assert c.lookup("192.0.2.1") == P.WORLD
    assert c.lookup("fd00::5") == 400
    assert c.lookup("fd01::5") == P.WORLD_IPV6  # as the datapath's ipcache6 says
    c.delete("10.1.0.0/16")
    assert c.lookup("10.1.9.9") == 100


def test_diagnostic_format_and_strict_loading_raises():
    bad = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: x\nspec:\n  endpointSelector: {}\n  ingres: []\n"
    result = load(bad, "bad.yaml")
    assert not result.ok
    assert str(result.errors[0]) == "bad.yaml:7: spec.ingres: unknown field"
    try:
        P.load_text(bad, "bad.yaml", strict=True)
    except P.PolicyError as exc:
        assert exc.diagnostics[0].line == 7
    else:
        raise AssertionError("strict load did not raise")


def test_incremental_compile_equals_full_and_keeps_shared_objects():
    from .helpers import rules

    two = SW + "---\n" + SW.replace("name: rule1", "name: rule2").replace("deathstar", "tiefighter")
    changed = two.replace(
        "/v1/request-landing\n",
        "/v1/request-landing\n        - method: GET\n          path: /health\n",
        1,
    )
    eps = {name: labels(spec) for name, spec in EPS.items()}
    alloc, cache = P.IdentityAllocator(), P.IPCache()
    old = P.compile_policy(rules(two), eps, alloc, cache, 1)
    new = P.compile_policy(rules(changed), eps, alloc, cache, 2, previous=old)
    full = P.compile_policy(rules(changed), eps, alloc, cache, 2)
    for name in eps:
        assert new.endpoints[name].map_state == full.endpoints[name].map_state
    # the untouched endpoint keeps its MapState object and its L7 rule-set id
    assert new.endpoints["tiefighter"].map_state is old.endpoints["tiefighter"].map_state
    assert set(new.l7) == set(full.l7)
    d = P.diff(old, new)
    assert set(d) == {"deathstar"}
    (entry,) = {e.l7_id for e in d["deathstar"].adds.values()}
    assert new.l7[entry].check("GET", "/health", "", []).allowed
    assert old.l7.get(entry) is None


def test_identity_ignores_per_pod_labels():
    a = P.IdentityAllocator()
    one = a.allocate(labels("k8s:app=web,k8s:pod-template-hash=abc,k8s:io.kubernetes.pod.uid=1"))
    two = a.allocate(labels("k8s:app=web,k8s:pod-template-hash=def,k8s:io.kubernetes.pod.uid=2"))
    assert one == two
    assert "pod-template-hash" not in str(a.labels_of(one))


def test_host_with_node_labels_is_still_the_host_identity():
    a = P.IdentityAllocator()
    assert a.allocate(P.parse_labels("reserved:host,k8s:kubernetes.io/hostname=n1")) == P.HOST
    assert a.allocate_cidr("192.0.2.0/24") >= P.LOCAL_SCOPE


def test_other_kubernetes_objects_are_skipped_with_a_warning_but_policy_typos_are_errors():
    mixed = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\n---\n" + SW
    result = load(mixed, "m.yaml")
    assert result.ok and len(result.rules) == 1
    assert (
        str(result.diagnostics[0])
        == "m.yaml:2: kind: apps/v1 Deployment is not a network policy: skipped"
    )
    typo = load(SW.replace("kind: CiliumNetworkPolicy", "kind: CiliumNetworkPolcy"), "t.yaml")
    assert not typo.ok
    crd = load(SW.replace("kind: CiliumNetworkPolicy", "kind: CiliumEndpoint"), "c.yaml")
    assert not crd.ok


NAMED_PORT_POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: named}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{ports: [{port: web, protocol: TCP}]}]
"""


def test_trace_resolves_named_ports_given_for_the_endpoints():
    src, dst = parse_peer("app=client", None), parse_peer("app=web", None)
    rs = rules(NAMED_PORT_POLICY)
    named = {"dst": {"web": 8080}}
    allowed = trace(rs, src, dst, 8080, 6, named_ports=named)
    assert allowed.verdict == "ALLOWED"
    assert any("matches port web/TCP (= 8080)" in line for line in allowed.log)
    assert trace(rs, src, dst, 8081, 6, named_ports=named).verdict == "DENIED"
    # Without the endpoints' ports the name resolves to nothing, as in the agent's compile.
    unnamed = trace(rs, src, dst, 8080, 6)
    assert unnamed.verdict == "DENIED"
    assert any("named port 'web' is not known" in line for line in unnamed.log)
