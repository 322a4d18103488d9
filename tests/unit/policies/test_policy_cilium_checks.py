"""What Cilium's own validation (pkg/policy/api/rule_validation.go and the CRD schema) refuses is
refused here too, with `FILE:LINE: FIELD: reason` (issue 19 part 3). docs/policy.md lists every
check with the test that covers it; each case here names its check."""

from __future__ import annotations

import pytest

import policies as P

from .test_policy_semantics import cnp


def errors(text: str) -> list[str]:
    return [str(d) for d in P.load_text(text, "p.yaml").errors]


SEL = "endpointSelector: {matchLabels: {app: web}}\n"

CASES = {
    # one ingress/egress rule names one kind of L3 peer
    "egress toCIDR with toEndpoints": (
        SEL + "egress:\n- toEndpoints: [{matchLabels: {app: db}}]\n  toCIDR: [10.0.0.0/8]",
        "p.yaml:10: spec.egress[0].toCIDR: toEndpoints and toCIDR cannot be combined in one rule",
    ),
    "ingress fromEntities with fromCIDRSet": (
        SEL + "ingress:\n- fromCIDRSet: [{cidr: 10.0.0.0/8}]\n  fromEntities: [world]",
        "p.yaml:10: spec.ingress[0].fromEntities: fromCIDRSet and fromEntities cannot be combined",
    ),
    "egress toFQDNs with toEndpoints": (
        SEL + "egress:\n- toEndpoints: [{}]\n  toFQDNs: [{matchName: a.example}]",
        "p.yaml:10: spec.egress[0].toFQDNs: toEndpoints and toFQDNs cannot be combined",
    ),
    "toServices with toPorts": (
        SEL + "egress:\n- toServices: [{k8sService: {serviceName: a}}]\n"
        "  toPorts: [{ports: [{port: '80', protocol: TCP}]}]",
        "p.yaml:10: spec.egress[0].toPorts: toServices and toPorts cannot be combined",
    ),
    # CIDR sets take prefixes only
    "fromCIDRSet bare address": (
        SEL + "ingress:\n- fromCIDRSet:\n  - cidr: 10.1.2.3",
        "p.yaml:10: spec.ingress[0].fromCIDRSet[0].cidr: '10.1.2.3' has no prefix length: "
        "write 10.1.2.3/32 (only fromCIDR/toCIDR take a bare address)",
    ),
    "toCIDRSet except bare address": (
        SEL + "egress:\n- toCIDRSet:\n  - cidr: 10.0.0.0/8\n    except: ['10.1.2.3']",
        "p.yaml:11: spec.egress[0].toCIDRSet[0].except[0]: '10.1.2.3' has no prefix length",
    ),
    "NetworkPolicy ipBlock bare address": (
        "",
        "",
    ),
    # ports
    "port missing": (
        SEL + "ingress:\n- toPorts: [{ports: [{protocol: TCP}]}]",
        "p.yaml:9: spec.ingress[0].toPorts[0].ports[0].port: is required",
    ),
    "more than 40 ports": (
        SEL
        + "ingress:\n- toPorts:\n  - ports: ["
        + ", ".join(f"{{port: '{p}'}}" for p in range(1000, 1041))
        + "]",
        "p.yaml:10: spec.ingress[0].toPorts[0].ports: 41 ports; at most 40 in one toPorts entry",
    ),
    "more than 40 icmp fields": (
        SEL + "ingress:\n- icmps:\n  - fields: [" + ", ".join(["{type: 8}"] * 41) + "]",
        "p.yaml:10: spec.ingress[0].icmps[0].fields: 41 fields; at most 40",
    ),
    # L7 rules
    "DNS rules on ingress": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n"
        "    rules: {dns: [{matchPattern: '*'}]}",
        "p.yaml:11: spec.ingress[0].toPorts[0].rules.dns: DNS rules are not allowed on ingress",
    ),
    "DNS rules without a port": (
        SEL + "egress:\n- toEndpoints: [{}]\n  toPorts:\n  - rules: {dns: [{matchPattern: '*'}]}",
        "p.yaml:11: spec.egress[0].toPorts[0].ports: DNS rules need their port (53)",
    ),
    "l7 without l7proto": (
        SEL + "egress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n"
        "    rules: {l7: [{a: b}]}",
        "p.yaml:11: spec.egress[0].toPorts[0].rules.l7: l7 needs l7proto",
    ),
    "L7 rules in a host policy": (
        "nodeSelector: {}\ningress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n"
        "    rules: {http: [{}]}",
        "p.yaml:8: spec.ingress[0].toPorts: a host policy (nodeSelector) cannot have L7 rules",
    ),
    # TLS / listener settings Cilium refuses outright
    "empty server name": (
        SEL + "egress:\n- toPorts:\n  - ports: [{port: '443', protocol: TCP}]\n"
        "    serverNames: ['']",
        "p.yaml:11: spec.egress[0].toPorts[0].serverNames: an empty server name is not allowed",
    ),
    "serverNames with L7 rules and no terminatingTLS": (
        SEL + "egress:\n- toPorts:\n  - ports: [{port: '443', protocol: TCP}]\n"
        "    serverNames: [a.example]\n    rules: {http: [{}]}",
        "p.yaml:11: spec.egress[0].toPorts[0].serverNames: serverNames with L7 rules need "
        "terminatingTLS",
    ),
    "listener on ingress": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n"
        "    listener: {envoyConfig: {kind: CiliumEnvoyConfig, name: x}, name: l}",
        "p.yaml:11: spec.ingress[0].toPorts[0].listener: a listener is not allowed on ingress",
    ),
    "listener with L7 rules": (
        SEL + "egress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n"
        "    listener: {envoyConfig: {kind: CiliumEnvoyConfig, name: x}, name: l}\n"
        "    rules: {http: [{}]}",
        "p.yaml:11: spec.egress[0].toPorts[0].listener: a listener is not allowed together "
        "with L7 rules",
    ),
    # toFQDNs and dns entries are checked as Cilium's CRD does
    "toFQDNs entry naming both": (
        SEL + "egress:\n- toFQDNs: [{matchName: a.example, matchPattern: '*.example'}]",
        "p.yaml:9: spec.egress[0].toFQDNs[0]: needs exactly one of matchName or matchPattern",
    ),
    "toFQDNs name syntax": (
        SEL + "egress:\n- toFQDNs: [{matchName: 'a b.example'}]",
        "p.yaml:9: spec.egress[0].toFQDNs[0].matchName: invalid DNS matchName 'a b.example'",
    ),
    "toFQDNs double star": (
        SEL + "egress:\n- toFQDNs: [{matchPattern: '**.example.com'}]",
        "p.yaml:9: spec.egress[0].toFQDNs[0].matchPattern: invalid matchPattern '**.example.com': "
        "'**' is not a pattern",
    ),
    "dns rule double star": (
        SEL + "egress:\n- toEndpoints: [{}]\n  toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n"
        "    rules: {dns: [{matchPattern: '**'}]}",
        "p.yaml:12: spec.egress[0].toPorts[0].rules.dns[0].matchPattern: invalid matchPattern '**'",
    ),
    "toFQDNs in a deny rule": (
        SEL + "egressDeny:\n- toFQDNs: [{matchName: a.example}]",
        "p.yaml:9: spec.egressDeny[0].toFQDNs: toFQDNs is not supported in a deny rule",
    ),
    "port name with a double hyphen": (
        SEL + "ingress:\n- toPorts: [{ports: [{port: web--alt}]}]",
        "p.yaml:9: spec.ingress[0].toPorts[0].ports[0].port: invalid port 'web--alt'",
    ),
    # label selectors (Kubernetes ValidateLabelSelector)
    "label value syntax": (
        "endpointSelector: {matchLabels: {app: 'web server'}}",
        "p.yaml:7: spec.endpointSelector.matchLabels.app: invalid label value 'web server'",
    ),
    "label key syntax": (
        "endpointSelector:\n  matchExpressions: [{key: '-app', operator: Exists}]",
        "p.yaml:8: spec.endpointSelector.matchExpressions[0]: invalid label key '-app'",
    ),
    "label value length": (
        "endpointSelector: {matchLabels: {app: " + "a" * 64 + "}}",
        "p.yaml:7: spec.endpointSelector.matchLabels.app: invalid label value 'aaaa",
    ),
}
del CASES["NetworkPolicy ipBlock bare address"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cilium_refuses_it_so_do_we(case):
    spec, expected = CASES[case]
    found = errors(
        cnp(spec, kind="CiliumClusterwideNetworkPolicy", namespace="")
        if spec.startswith("nodeSelector")
        else cnp(spec)
    )
    assert any(e.startswith(expected) for e in found), (expected, found)


def test_the_same_rules_written_the_way_cilium_accepts_them_are_valid():
    ok = [
        SEL + "egress:\n- toEndpoints: [{matchLabels: {app: db}}]\n- toCIDR: [10.0.0.0/8]",
        SEL + "ingress:\n- fromCIDR: [10.1.2.3]\n- fromCIDRSet: [{cidr: 10.1.2.3/32}]",
        SEL + "egress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.2.3/32]}]",
        SEL
        + "ingress:\n- toPorts:\n  - ports: ["
        + ", ".join(f"{{port: '{p}'}}" for p in range(1000, 1040))
        + "]",
        SEL + "egress:\n- toPorts:\n  - ports: [{port: '53', protocol: UDP}]\n"
        "    rules: {dns: [{matchPattern: '*'}]}",
        "endpointSelector: {matchLabels: {'k8s:io.kubernetes.pod.namespace': kube-system, "
        "'example.com/tier': front_end.v1}}",
    ]
    for spec in ok:
        result = P.load_text(cnp(spec), "p.yaml")
        assert result.ok, (spec, [str(d) for d in result.errors])


def test_a_policy_whose_rules_sit_outside_spec_is_refused():
    """Accepted silently before: it selected endpoints and enforced nothing."""
    text = (
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: p\n"
        "  labels: {a: b}\n  color: red\n"
        "spec:\n  endpointSelector: {matchLabels: {app: web}}\n"
        "ingress:\n- fromEndpoints: [{matchLabels: {app: api}}]\n"
        "egressDeny: []\nstatus: {}\nextra: 1\n"
    )
    assert errors(text) == [
        "p.yaml:9: ingress: unknown field at the top level: ingress belongs under spec",
        "p.yaml:11: egressDeny: unknown field at the top level: egressDeny belongs under spec",
        "p.yaml:13: extra: unknown field of a CiliumNetworkPolicy",
        "p.yaml:6: metadata.color: unknown field",
    ]
    knp = (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\n"
        "spec: {podSelector: {}}\npodSelector: {}\nspecs: []\n"
    )
    assert errors(knp) == [
        "p.yaml:5: podSelector: unknown field at the top level: podSelector belongs under spec",
        "p.yaml:6: specs: unknown field of a NetworkPolicy",
    ]


def test_network_policy_ports_may_omit_the_port_and_ip_blocks_need_a_prefix():
    text = (
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: n}\n"
        "spec:\n  podSelector: {}\n  ingress:\n  - ports: [{protocol: UDP}]\n"
        "    from: [{ipBlock: {cidr: 10.1.2.3}}]\n"
    )
    assert errors(text) == [
        "p.yaml:8: spec.ingress[0].from[0].ipBlock.cidr: '10.1.2.3' has no prefix length: "
        "write 10.1.2.3/32 (only fromCIDR/toCIDR take a bare address)"
    ]


def test_port_names_compare_case_insensitively_as_in_cilium():
    rules = P.load_text(cnp(SEL + "ingress:\n- toPorts: [{ports: [{port: HTTP-Alt}]}]"), "p.yaml")
    assert rules.ok and rules.rules[0].ingress[0].ports[0].ports[0].name == "http-alt"


# Checks this engine already made before the list was written; each keeps a test here.
EARLIER = {
    "neither selector": ("ingress: [{}]", "spec.endpointSelector: one of endpointSelector or"),
    "both selectors": (
        SEL + "nodeSelector: {}",
        "spec.nodeSelector: endpointSelector and nodeSelector are mutually exclusive",
    ),
    "nodeSelector in a namespaced policy": (
        "nodeSelector: {}",
        "spec.nodeSelector: only a CiliumClusterwideNetworkPolicy may select nodes",
    ),
    "In without values": (
        "endpointSelector: {matchExpressions: [{key: app, operator: In}]}",
        "spec.endpointSelector.matchExpressions[0].values: In needs values",
    ),
    "Exists with values": (
        "endpointSelector: {matchExpressions: [{key: app, operator: Exists, values: [a]}]}",
        "spec.endpointSelector.matchExpressions[0].values: Exists must not have values",
    ),
    "icmps with toPorts": (
        SEL + "ingress:\n- icmps: [{fields: [{type: 8}]}]\n  toPorts: [{ports: [{port: '80'}]}]",
        "spec.ingress[0].icmps: icmps and toPorts cannot be combined in one rule",
    ),
    "empty CIDR": (SEL + "egress:\n- toCIDR: ['']", "spec.egress[0].toCIDR[0]: invalid CIDR ''"),
    "except outside its CIDR": (
        SEL + "egress:\n- toCIDRSet: [{cidr: 10.0.0.0/8, except: [11.0.0.0/16]}]",
        "spec.egress[0].toCIDRSet[0].except[0]: 11.0.0.0/16 is not inside 10.0.0.0/8",
    ),
    "endPort below port": (
        SEL + "ingress:\n- toPorts: [{ports: [{port: '80', endPort: 70}]}]",
        "spec.ingress[0].toPorts[0].ports[0].endPort: endPort 70 is below port 80",
    ),
    "endPort out of range": (
        SEL + "ingress:\n- toPorts: [{ports: [{port: '80', endPort: 70000}]}]",
        "spec.ingress[0].toPorts[0].ports[0].endPort: invalid endPort 70000",
    ),
    "L7 rules on port 0": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '0', protocol: TCP}]\n"
        "    rules: {http: [{}]}",
        "spec.ingress[0].toPorts[0].ports[0].port: http rules need a non-zero port",
    ),
    "ICMP family": (
        SEL + "ingress:\n- icmps: [{fields: [{type: 8, family: IPv5}]}]",
        "spec.ingress[0].icmps[0].fields[0].family: unknown family 'IPv5'",
    ),
    "ICMP type": (
        SEL + "ingress:\n- icmps: [{fields: [{type: 256}]}]",
        "spec.ingress[0].icmps[0].fields[0].type: unknown IPv4 ICMP type 256",
    ),
    "headerMatches without a name": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n"
        "    rules: {http: [{headerMatches: [{value: x}]}]}",
        "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0]: needs name",
    ),
    "headerMatches mismatch action": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '80', protocol: TCP}]\n"
        "    rules: {http: [{headerMatches: [{name: a, mismatch: DROP}]}]}",
        "spec.ingress[0].toPorts[0].rules.http[0].headerMatches[0].mismatch: unknown mismatch",
    ),
    "Kafka role with apiKey": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '9092', protocol: TCP}]\n"
        "    rules: {kafka: [{role: produce, apiKey: fetch}]}",
        "spec.ingress[0].toPorts[0].rules.kafka[0].apiKey: role and apiKey are mutually",
    ),
    "Kafka role": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '9092', protocol: TCP}]\n"
        "    rules: {kafka: [{role: admin}]}",
        "spec.ingress[0].toPorts[0].rules.kafka[0].role: unknown role 'admin'",
    ),
    "Kafka apiVersion": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '9092', protocol: TCP}]\n"
        "    rules: {kafka: [{apiVersion: x}]}",
        "spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion: invalid apiVersion 'x'",
    ),
    "Kafka topic": (
        SEL + "ingress:\n- toPorts:\n  - ports: [{port: '9092', protocol: TCP}]\n"
        "    rules: {kafka: [{topic: 'a/b'}]}",
        "spec.ingress[0].toPorts[0].rules.kafka[0].topic: invalid Kafka topic name 'a/b'",
    ),
    "enableDefaultDeny not a boolean": (
        SEL + "enableDefaultDeny: {ingress: 'no'}",
        "spec.enableDefaultDeny.ingress: must be true or false",
    ),
}


@pytest.mark.parametrize("case", sorted(EARLIER))
def test_checks_made_before_stay_made(case):
    spec, expected = EARLIER[case]
    found = [e.split(": ", 1)[1] for e in errors(cnp(spec))]
    assert any(e.startswith(expected) for e in found), (expected, found)
