"""The Cilium example policies that use toFQDNs and dns rules, compiled as written (no warnings):
the DNS port redirects to a DNS rule set with the example's names, and toFQDNs allows exactly the
IPs learned for its names, on its ports."""

import pytest

import policies as P
from tests.shared import CILIUM_EXAMPLES

from .helpers import labels

EXAMPLES = CILIUM_EXAMPLES
pytestmark = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="../shared is not present")


def load(name):
    result = P.load_text((EXAMPLES / name).read_text(), name)
    assert result.ok and not result.diagnostics, [str(d) for d in result.diagnostics]
    return result.rules


def compile_for(rules, app_labels, learned):
    eps = {
        "app": labels(app_labels),
        "kube-dns": labels("k8s-app=kube-dns", namespace="kube-system"),
    }
    ipcache = P.IPCache()
    compiled = P.compile_policy(rules, eps, P.IdentityAllocator(), ipcache, 1, learned=learned)
    return compiled, ipcache


def test_dns_visibility_example():
    learned = {
        "cilium.io": ["192.0.2.1"],
        "sub.cilium.io": ["192.0.2.2"],
        "special-x-service.api.cilium.io": ["192.0.2.3"],
        "other.cilium.io": ["192.0.2.4"],  # resolvable (the dns rule allows it), not in toFQDNs
    }
    rules = load("examples__policies__l7__dns__dns.yaml")
    compiled, ipcache = compile_for(rules, "org=alliance", learned)
    dns_id = compiled.endpoints["kube-dns"].identity
    v = P.l4_verdict(compiled, "app", dns_id, P.EGRESS, P.PROTO_UDP, 53)
    rs = compiled.l7[v.l7_id]
    assert v.action == "redirect" and rs.parser == "dns"
    assert rs.check("cilium.io").allowed and rs.check("x.api.cilium.io").allowed
    assert not rs.check("a.b.cilium.io").allowed and not rs.check("evil.io").allowed
    for ip, want in (("192.0.2.1", "allow"), ("192.0.2.2", "allow"), ("192.0.2.3", "allow"),
                     ("192.0.2.4", "deny"), ("192.0.2.9", "deny")):  # fmt: skip
        got = P.l4_verdict(compiled, "app", ipcache.lookup(ip), P.EGRESS, P.PROTO_TCP, 80)
        assert got.action == want, ip
    got = P.l4_verdict(compiled, "app", ipcache.lookup("192.0.2.1"), P.EGRESS, P.PROTO_TCP, 443)
    assert got.action == "deny"


def test_fqdn_example_allows_all_ports_to_the_learned_name():
    rules = load("examples__policies__l3__fqdn__fqdn.yaml")
    compiled, ipcache = compile_for(rules, "app=test-app", {"my-remote-service.com": ["192.0.2.7"]})
    dns_id = compiled.endpoints["kube-dns"].identity
    v = P.l4_verdict(compiled, "app", dns_id, P.EGRESS, P.PROTO_TCP, 53)
    assert v.action == "redirect" and compiled.l7[v.l7_id].allow_all
    for port in (80, 443, 8080):
        got = P.l4_verdict(
            compiled, "app", ipcache.lookup("192.0.2.7"), P.EGRESS, P.PROTO_TCP, port
        )
        assert got.action == "allow"
    got = P.l4_verdict(compiled, "app", ipcache.lookup("192.0.2.8"), P.EGRESS, P.PROTO_TCP, 80)
    assert got.action == "deny"
