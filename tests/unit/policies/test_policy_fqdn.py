"""DNS names in policy: matchName/matchPattern semantics, dns rule sets, and toFQDNs peers that
resolve to the identities of IPs learned from DNS answers (one identity per selector set)."""

import pytest

import policies as P
from policies.fqdn import DnsRuleSet, FQDNSelector, check_selector, normalize

from .helpers import labels, rules

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: fqdn}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toEndpoints: [{matchLabels: {app: dns}}]
    toPorts:
    - ports: [{port: '53', protocol: ANY}]
      rules:
        dns: [{matchPattern: '*.example.com'}, {matchName: api.github.com}]
  - toFQDNs: [{matchName: api.example.com}, {matchPattern: '*.s3.example.com'}]
    toPorts:
    - ports: [{port: '443', protocol: TCP}]
  - toFQDNs: [{matchName: web.example.com}]
    toPorts:
    - ports: [{port: '80', protocol: TCP}]
      rules:
        http: [{method: GET, path: /public/.*}]
  - toCIDR: [10.9.0.0/16]
"""


def compile_with(learned, text=POLICY, allocator=None, ipcache=None):
    allocator = allocator or P.IdentityAllocator()
    ipcache = ipcache or P.IPCache()
    eps = {"client": labels("app=client"), "dns": labels("app=dns")}
    compiled = P.compile_policy(rules(text), eps, allocator, ipcache, 1, learned=learned)
    return compiled, allocator, ipcache


def egress(compiled, ipcache, ip, port, proto=6):
    return P.l4_verdict(compiled, "client", ipcache.lookup(ip), P.EGRESS, proto, port)


@pytest.mark.parametrize(
    "selector,name,hit",
    [
        (FQDNSelector("", "*.example.com"), "a.example.com", True),
        (FQDNSelector("", "*.example.com"), "A.Example.COM.", True),
        (FQDNSelector("", "*.example.com"), "example.com", False),
        (FQDNSelector("", "*.example.com"), "a.b.example.com", False),
        (FQDNSelector("", "*.example.com"), "aexample.com", False),
        (FQDNSelector("", "api*.example.com"), "api-2.example.com", True),
        (FQDNSelector("", "*"), "anything.at.all", True),
        (FQDNSelector("example.com", ""), "EXAMPLE.com.", True),
        (FQDNSelector("example.com", ""), "www.example.com", False),
        (FQDNSelector("", "sub.*.example.com"), "sub.x.example.com", True),
        (FQDNSelector("", "sub.*.example.com"), "sub.x.y.example.com", False),
    ],
)
def test_match_semantics(selector, name, hit):
    assert selector.matches(normalize(name)) is hit


def test_invalid_selectors_say_why():
    assert "'**' is not a pattern" in check_selector("matchPattern", "**")
    assert "'**' is not a pattern" in check_selector("matchPattern", "**.example.com")
    assert check_selector("matchName", "*.example.com").startswith("invalid DNS matchName")
    assert check_selector("matchName", "a" * 256).endswith("longer than 255 characters")
    assert check_selector("matchPattern", "*.example.com") is None


def test_dns_rule_set_forwards_matching_names_only():
    rs = DnsRuleSet([FQDNSelector("", "*.example.com"), FQDNSelector("api.github.com", "")])
    assert rs.check("www.example.com").allowed and rs.check("www.example.com").matched == (0,)
    assert rs.check("API.GITHUB.COM.").matched == (1,)
    assert not rs.check("example.com").allowed
    assert not rs.check("evil.com").allowed
    assert DnsRuleSet([FQDNSelector("", "*")]).check("evil.com").allowed


def test_dns_port_rule_redirects_to_the_dns_rule_set():
    compiled, _, _ = compile_with({})
    dns_id = compiled.endpoints["dns"].identity
    for proto in (6, 17):
        v = P.l4_verdict(compiled, "client", dns_id, P.EGRESS, proto, 53)
        assert v.action == "redirect"
        rs = compiled.l7[v.l7_id]
        assert rs.parser == "dns" and sorted(rs.describe()) == [
            "matchName:api.github.com.",
            "matchPattern:*.example.com.",
        ]


def test_toFQDNs_allows_only_learned_ips_and_ports():
    learned = {"api.example.com": ["192.0.2.10"], "evil.com": ["192.0.2.66"]}
    compiled, _, ipcache = compile_with(learned)
    assert egress(compiled, ipcache, "192.0.2.10", 443).action == "allow"
    assert egress(compiled, ipcache, "192.0.2.10", 80).action == "deny"
    assert egress(compiled, ipcache, "192.0.2.66", 443).action == "deny"  # not selected
    assert egress(compiled, ipcache, "192.0.2.99", 443).action == "deny"  # never returned


def test_ips_selected_alike_share_one_identity():
    learned = {
        "a.s3.example.com": ["192.0.2.1", "192.0.2.2"],
        "b.s3.example.com": ["192.0.2.3"],
        "api.example.com": ["192.0.2.4"],
    }
    compiled, allocator, ipcache = compile_with(learned)
    s3 = {ipcache.lookup(ip) for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3")}
    assert len(s3) == 1 and ipcache.lookup("192.0.2.4") not in s3
    assert min(s3) >= P.LOCAL_SCOPE
    # 100 rotating answers for one name: still one identity, ipcache grows by the IPs only
    many = {f"x{i}.s3.example.com": [f"198.51.100.{i}"] for i in range(100)}
    compiled, allocator, ipcache = compile_with(many)
    assert len({ipcache.lookup(f"198.51.100.{i}") for i in range(100)}) == 1


def test_ip_selected_by_two_selectors_gets_the_union_identity():
    learned = {"web.example.com": ["192.0.2.7"], "api.example.com": ["192.0.2.7"]}
    compiled, _, ipcache = compile_with(learned)
    assert egress(compiled, ipcache, "192.0.2.7", 443).action == "allow"
    v = egress(compiled, ipcache, "192.0.2.7", 80)
    assert v.action == "redirect" and compiled.l7[v.l7_id].parser == "http"


def test_forgotten_names_release_identities_and_ipcache_entries():
    compiled, allocator, ipcache = compile_with({"api.example.com": ["192.0.2.10"]})
    number = ipcache.lookup("192.0.2.10")
    assert number >= P.LOCAL_SCOPE
    compiled, allocator, ipcache = compile_with({}, allocator=allocator, ipcache=ipcache)
    assert ipcache.lookup("192.0.2.10") == P.WORLD
    assert allocator.labels_of(number) is None
    assert egress(compiled, ipcache, "192.0.2.10", 443).action == "deny"


def test_learned_ip_inside_a_policy_cidr_keeps_the_cidr_rule():
    compiled, _, ipcache = compile_with({"api.example.com": ["10.9.1.1"]})
    assert egress(compiled, ipcache, "10.9.1.1", 443).action == "allow"
    assert egress(compiled, ipcache, "10.9.1.1", 22).action == "allow"  # toCIDR: all ports
    assert egress(compiled, ipcache, "10.9.1.2", 22).action == "allow"


def test_deny_cidr_wins_over_fqdn_allow():
    text = POLICY + "  egressDeny:\n  - toCIDR: [192.0.2.0/24]\n"
    compiled, _, ipcache = compile_with({"api.example.com": ["192.0.2.10"]}, text)
    assert egress(compiled, ipcache, "192.0.2.10", 443).action == "deny"


def test_world_entity_selects_learned_ips():
    text = POLICY.replace("  - toCIDR: [10.9.0.0/16]\n", "  - toEntities: [world]\n")
    compiled, _, ipcache = compile_with({"api.example.com": ["192.0.2.10"]}, text)
    assert egress(compiled, ipcache, "192.0.2.10", 22).action == "allow"


def test_identities_survive_a_restart_of_the_allocator():
    learned = {"api.example.com": ["192.0.2.10"]}
    _, allocator, ipcache = compile_with(learned)
    before = ipcache.lookup("192.0.2.10")
    restored = P.IdentityAllocator(allocator.to_state())
    _, _, ipcache2 = compile_with(learned, allocator=restored)
    assert ipcache2.lookup("192.0.2.10") == before


def test_trace_explains_a_dns_verdict_and_an_fqdn_selected_ip():
    from policies.trace import parse_peer, trace

    client = parse_peer("app=client", None)
    dns = parse_peer("app=dns", None)
    refused = trace(rules(POLICY), client, dns, 53, P.PROTO_UDP, dns="evil.com")
    assert refused.verdict == "DENIED" and refused.l7["rule_sets"][0]["parser"] == "dns"
    assert any("evil.com. does not match matchPattern:*.example.com." in ln for ln in refused.log)
    allowed = trace(rules(POLICY), client, dns, 53, P.PROTO_UDP, dns="www.example.com")
    assert allowed.verdict == "ALLOWED"
    world = parse_peer("reserved:world", "192.0.2.9")
    learned = trace(rules(POLICY), client, world, 443, P.PROTO_TCP, fqdn="api.example.com")
    assert learned.verdict == "ALLOWED"
    assert trace(rules(POLICY), client, world, 443, P.PROTO_TCP).verdict == "DENIED"


def test_learned_labels_predict_the_compilers_identity():
    from policies.compile import LearnedLabels

    compiled, allocator, ipcache = compile_with({"a.s3.example.com": ["192.0.2.1"]})
    index = LearnedLabels(compiled.rules)
    # a new IP for another *.s3 name: same selector set, so the same (existing) identity
    labels = index.labels(["b.s3.example.com."], "192.0.2.2")
    assert allocator.lookup(labels) == ipcache.lookup("192.0.2.1")
    # inside the policy's 10.9.0.0/16: another label set, not allocated yet
    assert allocator.lookup(index.labels(["b.s3.example.com."], "10.9.0.1")) is None
    assert index.labels(["evil.com."], "192.0.2.3") is None
