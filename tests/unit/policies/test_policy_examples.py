"""Cilium's own example policies: they validate, compile and give the verdicts their docs promise."""

import pytest

import policies as P
from l7proxy.policy_files import load_paths
from tests.shared import CILIUM_EXAMPLES as SHARED  # noqa: E402

from .helpers import labels

pytestmark = pytest.mark.skipif(
    not SHARED.is_dir(), reason="../shared is not present (it is in CI)"
)


def example(name: str) -> list[P.Rule]:
    result = load_paths([SHARED / name])
    assert result.ok, [str(d) for d in result.errors]
    return result.rules


def compile_for(rules, endpoints):
    eps = {name: labels(spec) for name, spec in endpoints.items()}
    return P.compile_policy(rules, eps, P.IdentityAllocator(), P.IPCache(), 1)


def verdict(c, dst, src, port, proto=6, direction=P.INGRESS):
    peer = c.endpoints[src].identity if isinstance(src, str) else src
    return P.l4_verdict(c, dst, peer, direction, proto, port)


def test_every_example_compiles_against_endpoints_made_from_its_own_labels():
    for path in sorted(SHARED.glob("*.yaml")):
        rules = load_paths([path]).rules
        specs = {"plain": "k8s:app=plain"}
        for rule in rules:
            for i, sel in enumerate(r for r in (rule.selector,) if r is not None):
                pairs = [
                    f"{q.source + ':' if q.source not in ('', 'any') else ''}{q.key}={q.values[0] if q.values else ''}"
                    for q in sel.requirements
                    if q.operator == "In"
                ]
                if pairs:
                    specs[f"{rule.ident}-{i}"] = ",".join(pairs)
        compiled = compile_for(rules, specs)
        for name, ep in compiled.endpoints.items():
            for key, entry in ep.map_state.items():
                assert entry.l7_id == 0 or entry.l7_id in compiled.l7, (path.name, name, key)


def test_star_wars_l3_l4_l7():
    c = compile_for(
        example("examples__minikube__sw_l3_l4_l7_policy.yaml"),
        {
            "deathstar": "k8s:org=empire,k8s:class=deathstar",
            "tie": "k8s:org=empire,k8s:class=tiefighter",
            "xwing": "k8s:org=alliance,k8s:class=xwing",
        },
    )
    v = verdict(c, "deathstar", "tie", 80)
    assert v.action == "redirect"
    rs = c.l7[v.l7_id]
    assert rs.check(
        "POST", "/v1/request-landing", "deathstar.default.svc.cluster.local", []
    ).allowed
    assert not rs.check("PUT", "/v1/exhaust-port", "deathstar", []).allowed
    assert verdict(c, "deathstar", "xwing", 80).action == "deny"


def test_kafka_security_policy_roles_and_topics():
    c = compile_for(
        example("examples__kubernetes-kafka__kafka-sw-security-policy.yaml"),
        {
            "kafka": "k8s:app=kafka",
            "hq": "k8s:app=empire-hq",
            "outpost": "k8s:app=empire-outpost",
            "backup": "k8s:app=empire-backup",
        },
    )
    hq = c.l7[verdict(c, "kafka", "hq", 9092).l7_id]
    assert hq.check(0, 7, "hq", ["deathstar-plans"]).allowed
    assert not hq.check(1, 11, "hq", ["deathstar-plans"]).allowed
    outpost = c.l7[verdict(c, "kafka", "outpost", 9092).l7_id]
    assert outpost.check(1, 11, "o", ["empire-announce"]).allowed
    assert not outpost.check(1, 11, "o", ["deathstar-plans"]).allowed
    assert not outpost.check(0, 7, "o", ["empire-announce"]).allowed
    assert outpost.topic_visible("empire-announce") and not outpost.topic_visible("deathstar-plans")
    # kafka <-> kafka is plain L3
    assert verdict(c, "kafka", "kafka", 9092).action == "allow"
    assert verdict(c, "kafka", "xwing" if "xwing" in c.endpoints else "hq", 9093).action == "deny"


def test_deny_to_app1_with_default_allow():
    c = compile_for(
        example("test__k8s__manifests__cnp-deny-to-app1-default-allow.yaml"),
        {"app1": "k8s:id=app1", "app2": "k8s:id=app2", "app3": "k8s:id=app3"},
    )
    assert verdict(c, "app2", "app1", 80, direction=P.EGRESS).action == "deny"
    assert verdict(c, "app2", "app3", 80, direction=P.EGRESS).action == "allow"
    assert verdict(c, "app2", P.WORLD, 443, direction=P.EGRESS).action == "allow"


def test_cidr_example_with_except():
    c = compile_for(
        example("examples__policies__l3__cidr__cidr.yaml"), {"svc": "k8s:app=myService"}
    )
    cache = P.IPCache()
    alloc = P.IdentityAllocator()
    c = P.compile_policy(
        example("examples__policies__l3__cidr__cidr.yaml"),
        {"svc": labels("k8s:app=myService")},
        alloc,
        cache,
        1,
    )
    out = lambda ip: verdict(c, "svc", cache.lookup(ip), 443, direction=P.EGRESS).action  # noqa: E731
    assert out("20.1.1.1") == "allow" and out("10.5.5.5") == "allow"
    assert out("10.100.0.1") == "deny" and out("20.1.1.2") == "deny"


def test_namespace_isolation_example():
    c = compile_for(
        example("examples__policies__kubernetes__namespace__isolate-namespaces.yaml"),
        {
            "a1": "k8s:app=a,k8s:io.kubernetes.pod.namespace=ns1",
            "b1": "k8s:app=b,k8s:io.kubernetes.pod.namespace=ns1",
            "a2": "k8s:app=a,k8s:io.kubernetes.pod.namespace=ns2",
            "d": "k8s:app=d",
        },
    )
    assert verdict(c, "a1", "b1", 80).action == "allow"
    assert verdict(c, "a1", "a2", 80).action == "deny"
    assert verdict(c, "a2", "a1", 80).action == "deny"
    assert verdict(c, "d", "a1", 80).action == "allow"  # default is not isolated


def test_l4_port_range_example():
    c = compile_for(
        example("examples__policies__l4__l4_port_range.yaml"),
        {"svc": "k8s:app=myService", "x": "k8s:app=x"},
    )
    assert [verdict(c, "svc", "x", p, direction=P.EGRESS).action for p in (79, 80, 444, 445)] == [
        "deny",
        "allow",
        "allow",
        "deny",
    ]
