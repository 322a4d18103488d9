"""CiliumNetworkPolicy YAML -> policies.compile_policy -> Datapath.sync -> real traffic, checked
against the policy engine's own verdicts (l4_verdict), then a one-rule change synced as a diff."""

from __future__ import annotations

import textwrap

import pytest

import policies as P
from tests.kernel.conftest import host_addresses, topology
from tests.kernel.netns import BLOCKED, EchoServer, tcp_ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]


def cnp_text(spare: str, host_port: int, b_port: int) -> str:
    return textwrap.dedent(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: b-in, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {{app: b}}}}
          ingress:
          - fromEndpoints: [{{matchLabels: {{app: a}}}}]
            toPorts:
            - ports:
              - {{port: "{b_port}", protocol: TCP}}
              - {{port: "9000", endPort: 9003, protocol: TCP}}
          - fromEndpoints: [{{matchLabels: {{app: c}}}}]
          ingressDeny:
          - fromEndpoints: [{{matchLabels: {{app: c}}}}]
            toPorts: [{{ports: [{{port: "9002", protocol: TCP}}]}}]
        ---
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: a-out, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {{app: a}}}}
          egress:
          - toEndpoints: [{{matchLabels: {{app: b}}}}]
          - toCIDRSet: [{{cidr: {spare}.0/24, except: [{spare}.128/25]}}]
          - toEntities: [host]
            toPorts: [{{ports: [{{port: "{host_port}", protocol: TCP}}]}}]
        """
    )


def compile_(text, endpoints, allocator, ipcache, revision, previous=None):
    result = P.load_text(text, "policy.yaml")
    assert result.ok, [str(d) for d in result.diagnostics]
    return P.compile_policy(
        result.rules, endpoints, allocator, ipcache, revision, previous=previous
    )


def test_compiled_policy_enforced_in_the_kernel_matches_the_engine():
    with topology() as t:
        a, b, c = t.pods
        names = {"a": t.ids[0], "b": t.ids[1], "c": t.ids[2]}
        ns = "k8s:io.kubernetes.pod.namespace=default"
        endpoints = {n: P.parse_labels(f"k8s:app={n},{ns}") for n in names}
        spare = f"10.250.{t.spare_octet}"
        inside, excepted = f"{spare}.1", f"{spare}.129"
        with host_addresses(f"{inside}/32", f"{excepted}/32"):
            extra = [EchoServer(b.netns, b.pod_ip, p) for p in (8080, 8081, 9002, 9005)]
            outside = [EchoServer(None, ip) for ip in (inside, excepted)]
            host = EchoServer(None, a.host_ip)
            try:
                allocator, ipcache = P.IdentityAllocator(None), P.IPCache()
                compiled = compile_(
                    cnp_text(spare, host.port, 8080), endpoints, allocator, ipcache, 1
                )
                pods = {"a": a, "b": b, "c": c}
                for name, p in pods.items():
                    ipcache.upsert(f"{p.pod_ip}/32", compiled.endpoints[name].identity)
                    ipcache.upsert(f"{p.host_ip}/32", P.HOST)
                t.dp.ipcache_sync(dict(ipcache.items()))
                stats = t.dp.sync(compiled, names, proxy_ports={})
                assert stats.adds == sum(len(e.map_state) for e in compiled.endpoints.values())

                def engine_allows(src, dst_ip, port):
                    peer = ipcache.lookup(dst_ip)
                    out = P.l4_verdict(compiled, src, peer, P.EGRESS, 6, port).action
                    dst = next((n for n, p in pods.items() if p.pod_ip == dst_ip), None)
                    into = "allow"
                    if dst:
                        src_id = compiled.endpoints[src].identity
                        into = P.l4_verdict(compiled, dst, src_id, P.INGRESS, 6, port).action
                    return out == "allow" and into == "allow"

                cases = [
                    ("a", b.pod_ip, 8080, True),
                    ("a", b.pod_ip, 9002, True),  # inside the endPort range
                    ("a", b.pod_ip, 9005, False),
                    ("c", b.pod_ip, 8080, True),
                    ("c", b.pod_ip, 9002, False),  # ingressDeny beats the allow
                    ("a", c.pod_ip, t.servers[2].port, False),  # a may only reach b
                    ("a", inside, outside[0].port, True),  # toCIDRSet
                    ("a", excepted, outside[1].port, False),  # ...except
                    ("a", a.host_ip, host.port, True),  # toEntities: host, on that port
                ]
                for src, ip, port, expected in cases:
                    assert engine_allows(src, ip, port) is expected, (src, ip, port)
                    got = tcp_ok(pods[src].netns, ip, port, timeout=5 if expected else BLOCKED)
                    assert got is expected, (src, ip, port)

                # One rule changes (b's port 8080 -> 8081): only its diff reaches the kernel.
                new = compile_(
                    cnp_text(spare, host.port, 8081),
                    endpoints,
                    allocator,
                    ipcache,
                    2,
                    previous=compiled,
                )
                changes = P.diff(compiled, new)
                expected_touch = sum(len(ch.adds) + len(ch.deletes) for ch in changes.values())
                stats = t.dp.sync(new, names, proxy_ports={})
                assert 0 < stats.touched <= expected_touch
                assert (stats.adds, stats.deletes) == (
                    sum(len(ch.adds) for ch in changes.values()),
                    sum(len(ch.deletes) for ch in changes.values()),
                )
                assert tcp_ok(a.netns, b.pod_ip, 8081)
                assert not tcp_ok(a.netns, b.pod_ip, 8080, timeout=BLOCKED)
            finally:
                for s in (*extra, *outside, host):
                    s.close()
