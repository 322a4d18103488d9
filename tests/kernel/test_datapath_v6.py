"""The single-node datapath matrix over IPv6 and over dual-stack endpoints (issue 17): real
namespaces and veths, the tc programs, the v6 twin maps (ipcache6, conntrack6, ep_by_ip6).

Three dual-stack pods A, B, C and an IPv6-only pod D. "6" runs each case over IPv6 only, "dual"
runs it over both families at once and expects the same answer from each: the policy keys are
identities and ports, so one MapState governs both families."""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass

import pytest

import policies as P
from policies import INGRESS, PolicyEntry, PolicyKey
from redirect_bpf.structs import IDENTITY_WORLD, IDENTITY_WORLD_IPV6
from tests.kernel.conftest import drain, fresh_reader
from tests.kernel.netns import BLOCKED, EchoServer, free_octets, sh, tcp_ok, udp_ok
from tests.kernel.netns6 import (
    EchoServer6,
    Pod6,
    free_subnets,
    ping4_ok,
    ping6_ok,
    pod6,
    sock6_in,
    tcp6_ok,
    udp6_ok,
)
from tests.shared import CILIUM_EXAMPLES

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]

TCP, UDP, ICMP6 = 6, 17, 58
ALLOW = PolicyEntry(False, 0, ("test",))
DENY = PolicyEntry(True, 0, ("test",))


def K(identity, direction, proto=0, port=0, prefix_len=0):  # noqa: N802
    return PolicyKey(identity, direction, proto, port, prefix_len)


@dataclass
class Topo6:
    dp: object
    pods: list[Pod6]  # A, B, C dual stack; D IPv6 only
    ids: list[int]
    identities: list[int]
    servers6: list[EchoServer6]
    servers4: list[EchoServer | None]
    base_ipcache: dict[str, int]  # the pods' and their hosts' entries

    def reset(self) -> None:
        self.dp.ipcache_sync(self.base_ipcache)
        for ep_id in self.ids:
            self.dp.sync_endpoint(ep_id, {}, ingress_enforced=False, egress_enforced=False)
        self.dp.maps["conntrack"].clear()
        self.dp.maps["conntrack6"].clear()


@pytest.fixture(scope="module")
def topo6():
    from redirect_bpf.datapath import Datapath
    from redirect_bpf.structs import IDENTITY_HOST

    subnets, octets = free_subnets(4), free_octets(3)
    with contextlib.ExitStack() as stack:
        pods = [stack.enter_context(pod6(s, o)) for s, o in zip(subnets[:3], octets, strict=True)]
        pods.append(stack.enter_context(pod6(subnets[3])))
        dp = Datapath(f"/sys/fs/bpf/l7proxy/test-{uuid.uuid4().hex[:8]}", node="test")
        servers6, servers4, base = [], [], {}
        try:
            ids, identities = [201, 202, 203, 204], [2001, 2002, 2003, 2004]
            for p, ep_id, ident in zip(pods, ids, identities, strict=True):
                dp.attach_endpoint(p.host_if, ep_id, ident, p.pod_ip, p.pod_ip6)
                base[f"{p.pod_ip6}/128"] = ident
                base[f"{p.host_ip6}/128"] = IDENTITY_HOST
                if p.host_ip:
                    base[f"{p.pod_ip}/32"] = ident
                    base[f"{p.host_ip}/32"] = IDENTITY_HOST
                servers6.append(EchoServer6(p.netns, p.pod_ip6))
                port = servers6[-1].port
                servers4.append(EchoServer(p.netns, p.pod_ip, port) if p.pod_ip else None)
            dp.ipcache_sync(base)
            yield Topo6(dp, pods, ids, identities, servers6, servers4, base)
        finally:
            for s in (*servers6, *servers4):
                if s:
                    s.close()
            dp.destroy()


@pytest.fixture
def t6(topo6):
    topo6.reset()
    yield topo6
    topo6.reset()


def reach(src: Pod6, dst: Pod6, port: int, family: str, proto: str = "tcp") -> set[bool]:
    """The outcomes of one connection attempt per family ("6": IPv6; "dual": IPv6 and IPv4).
    A single outcome ({True} or {False}) means the families agree."""
    ok6, ok4 = (tcp6_ok, tcp_ok) if proto == "tcp" else (udp6_ok, udp_ok)
    out = {ok6(src.netns, dst.pod_ip6, port, timeout=3)}
    if family == "dual":
        out.add(ok4(src.netns, dst.pod_ip, port, timeout=3))
    return out


def blocked(src: Pod6, dst: Pod6, port: int, family: str, proto: str = "tcp") -> bool:
    ok6, ok4 = (tcp6_ok, tcp_ok) if proto == "tcp" else (udp6_ok, udp_ok)
    if ok6(src.netns, dst.pod_ip6, port, timeout=BLOCKED):
        return False
    return family != "dual" or not ok4(src.netns, dst.pod_ip, port, timeout=BLOCKED)


FAMILIES = ["6", "dual"]


@pytest.mark.parametrize("family", FAMILIES)
def test_allow_by_labels_then_default_deny(t6, family):
    a, b, c, _ = t6.pods
    port = t6.servers6[1].port
    reader = fresh_reader(t6.dp)
    try:
        assert reach(c, b, port, family) == {True}  # no policy on B
        t6.dp.sync_endpoint(
            t6.ids[1],
            {K(t6.identities[0], INGRESS): ALLOW},
            ingress_enforced=True,
            egress_enforced=False,
        )
        assert reach(a, b, port, family) == {True}
        assert reach(a, b, port, family, "udp") == {True}
        assert blocked(c, b, port, family)
        assert blocked(c, b, port, family, "udp")
        flows = drain(reader)
    finally:
        reader.stop()
    drops = [f for f in flows if f["verdict"] == "DROPPED" and ":" in f["source"]["ip"]]
    assert drops, flows
    d = drops[0]
    assert d["drop_reason_desc"] == "POLICY_DENIED"
    assert (d["source"]["ip"], d["destination"]["ip"]) == (c.pod_ip6, b.pod_ip6)
    assert (d["source"]["identity"], d["destination"]["identity"]) == (
        t6.identities[2],
        t6.identities[1],
    )
    allowed = [
        f
        for f in flows
        if f["verdict"] == "FORWARDED"
        and f["traffic_direction"] == "INGRESS"
        and f["source"]["ip"] == a.pod_ip6
    ]
    assert allowed and allowed[0]["policy_match"]["kind"] == "L3"


@pytest.mark.parametrize("family", FAMILIES)
def test_l4_ports_and_ranges(t6, family):
    a, b, c, _ = t6.pods
    servers = [EchoServer6(b.netns, b.pod_ip6, p) for p in (8080, 9001, 9004)]
    servers += [EchoServer(b.netns, b.pod_ip, p) for p in (8080, 9001, 9004)]
    try:
        state = {
            K(0, INGRESS, TCP, 8080, 16): ALLOW,
            K(t6.identities[0], INGRESS, TCP, 9000, 14): ALLOW,  # 9000-9003 for A
            K(0, INGRESS, UDP, 9004, 16): ALLOW,
        }
        t6.dp.sync_endpoint(t6.ids[1], state, ingress_enforced=True, egress_enforced=False)
        assert reach(a, b, 8080, family) == {True}
        assert reach(a, b, 9001, family) == {True}
        assert blocked(a, b, 9004, family)  # just outside the range
        assert blocked(a, b, 8080, family, "udp")  # the port rule is TCP only
        assert reach(a, b, 9004, family, "udp") == {True}
        assert blocked(c, b, 9001, family)  # the range is for A only
    finally:
        for s in servers:
            s.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_deny_beats_allow(t6, family):
    a, b, c, _ = t6.pods
    port = t6.servers6[1].port
    extra = [EchoServer6(b.netns, b.pod_ip6, 8081), EchoServer(b.netns, b.pod_ip, 8081)]
    try:
        state = {
            K(t6.identities[0], INGRESS): ALLOW,
            K(0, INGRESS, TCP, 8081, 16): DENY,
            K(0, INGRESS, TCP): ALLOW,
            K(t6.identities[2], INGRESS, TCP): DENY,
        }
        t6.dp.sync_endpoint(t6.ids[1], state, ingress_enforced=True, egress_enforced=False)
        assert reach(a, b, port, family) == {True}
        assert blocked(a, b, 8081, family)
        assert blocked(c, b, port, family)
    finally:
        for s in extra:
            s.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_replies_pass_even_when_the_reverse_direction_is_denied(t6, family):
    a, b, _, _ = t6.pods
    t6.dp.sync_endpoint(
        t6.ids[1],
        {K(t6.identities[0], INGRESS): ALLOW},
        ingress_enforced=True,
        egress_enforced=True,
    )
    assert reach(a, b, t6.servers6[1].port, family) == {True}
    assert reach(a, b, t6.servers6[1].port, family, "udp") == {True}
    assert blocked(b, a, t6.servers6[0].port, family)
    assert t6.dp.conntrack6(), "IPv6 flows are tracked in conntrack6"


def test_established_flow_survives_an_unrelated_change_and_is_cut_when_denied(t6):
    a, b, c, _ = t6.pods
    allow_a = {K(t6.identities[0], INGRESS, TCP): ALLOW}
    t6.dp.sync_endpoint(t6.ids[1], allow_a, ingress_enforced=True, egress_enforced=False)
    s = sock6_in(a.netns)
    s.settimeout(5.0)
    s.connect((b.pod_ip6, t6.servers6[1].port))
    try:
        s.sendall(b"one")
        assert s.recv(16) == b"one"
        stats = t6.dp.sync_endpoint(
            t6.ids[1],
            {**allow_a, K(t6.identities[2], INGRESS, UDP): ALLOW},
            ingress_enforced=True,
            egress_enforced=False,
        )
        assert (stats.adds, stats.updates, stats.deletes) == (1, 0, 0)
        s.sendall(b"two")
        assert s.recv(16) == b"two"
        t6.dp.sync_endpoint(
            t6.ids[1],
            {K(t6.identities[2], INGRESS, UDP): ALLOW},
            ingress_enforced=True,
            egress_enforced=False,
        )
        s.sendall(b"three")
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):
            s.recv(16)
    finally:
        s.close()


def test_icmpv6_echo_needs_an_icmps_rule_and_neighbour_discovery_always_passes(t6):
    a, b, c, _ = t6.pods
    # B enforces both directions and allows only echo requests from A (icmps type 128).
    t6.dp.sync_endpoint(
        t6.ids[1],
        {K(t6.identities[0], INGRESS, ICMP6, 128, 16): ALLOW},
        ingress_enforced=True,
        egress_enforced=True,
    )
    # Forget the neighbours on both sides: the echo first needs neighbour solicitations and
    # advertisements through both enforced directions.
    b.run("ip", "-6", "neigh", "flush", "all")
    sh("ip", "-6", "neigh", "flush", "dev", b.host_if)
    assert ping6_ok(a.netns, b.pod_ip6)
    assert not ping6_ok(c.netns, b.pod_ip6, timeout=BLOCKED)
    # No ICMPv6 rule at all: echo is dropped, TCP (allowed) still finds its neighbours.
    t6.dp.sync_endpoint(
        t6.ids[1],
        {K(t6.identities[0], INGRESS, TCP): ALLOW},
        ingress_enforced=True,
        egress_enforced=True,
    )
    b.run("ip", "-6", "neigh", "flush", "all")
    sh("ip", "-6", "neigh", "flush", "dev", b.host_if)
    assert not ping6_ok(a.netns, b.pod_ip6, timeout=BLOCKED)
    assert tcp6_ok(a.netns, b.pod_ip6, t6.servers6[1].port)


def test_an_ipv6_only_endpoint_is_enforced(t6):
    a, _, c, d = t6.pods
    assert t6.dp.ipcache_lookup(d.pod_ip6) == t6.identities[3]
    t6.dp.sync_endpoint(
        t6.ids[3],
        {K(t6.identities[0], INGRESS, TCP): ALLOW},
        ingress_enforced=True,
        egress_enforced=False,
    )
    assert tcp6_ok(a.netns, d.pod_ip6, t6.servers6[3].port)
    assert not tcp6_ok(c.netns, d.pod_ip6, t6.servers6[3].port, timeout=BLOCKED)


# -- compiled policies: CIDRs with except, entities, family separation --------------------------

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: a-out, namespace: default}}
spec:
  endpointSelector: {{matchLabels: {{app: a}}}}
  egress:
  - {peer}
"""


def _enforce(t6, peer: str) -> None:
    """Compile A's egress policy with one peer rule and sync it with the endpoints' ipcache."""
    names = {"a": t6.ids[0], "b": t6.ids[1], "c": t6.ids[2], "d": t6.ids[3]}
    ns = "k8s:io.kubernetes.pod.namespace=default"
    endpoints = {n: P.parse_labels(f"k8s:app={n},{ns}") for n in names}
    result = P.load_text(POLICY.format(peer=peer), "policy.yaml")
    assert result.ok, [str(d) for d in result.diagnostics]
    ipcache = P.IPCache(t6.base_ipcache.items())
    compiled = P.compile_policy(result.rules, endpoints, P.IdentityAllocator(None), ipcache, 1)
    assert compiled.endpoints["a"].egress_enforced
    t6.dp.ipcache_sync(dict(ipcache.items()))
    t6.dp.sync(compiled, names, proxy_ports={})


@contextlib.contextmanager
def lo_servers(*ips: str):
    """Echo servers on extra addresses of the host's lo (peers outside the cluster that the pods
    reach through their default routes)."""
    servers = []
    for ip in ips:
        sh("ip", "addr", "add", ip, "dev", "lo", *(("nodad",) if ":" in ip else ()))
    try:
        for ip in ips:
            servers.append((EchoServer6 if ":" in ip else EchoServer)(None, ip))
        yield [s.port for s in servers]
    finally:
        for s in servers:
            s.close()
        for ip in ips:
            sh("ip", "addr", "del", ip, "dev", "lo", check=False)


def _ok(src: Pod6, ip: str, port: int, expected: bool) -> bool:
    fn = tcp6_ok if ":" in ip else tcp_ok
    return fn(src.netns, ip, port, timeout=5 if expected else BLOCKED)


def test_cidr_set_with_except_and_the_world_entities(t6):
    a = t6.pods[0]
    group = f"{uuid.uuid4().int % 0xFFFF:x}"  # 1-4 hex digits
    net = f"fd00:251:{group}"
    inside, excepted, world6 = f"{net}::1", f"{net}::8001", f"fd00:252:{group}::1"
    world4 = f"10.250.{free_octets(1)[0]}.1"
    with lo_servers(inside, excepted, world6, world4) as ports:
        port = dict(zip((inside, excepted, world6, world4), ports, strict=True))
        cases = [
            (f'toCIDRSet: [{{cidr: "{net}::/64", except: ["{net}::8000/113"]}}]', {inside}),
            ("toEntities: [world-ipv6]", {inside, excepted, world6}),
            ("toEntities: [world-ipv4]", {world4}),
            ("toEntities: [world]", {inside, excepted, world6, world4}),
        ]
        for peer, reachable in cases:
            _enforce(t6, peer)
            for ip in port:
                expected = ip in reachable
                assert _ok(a, ip, port[ip], expected) is expected, (peer, ip)
        assert t6.dp.ipcache_lookup(world6) == IDENTITY_WORLD_IPV6
        assert t6.dp.ipcache_lookup(world4) == IDENTITY_WORLD


def test_a_v4_only_cidr_policy_never_reaches_ipv6_and_the_reverse(t6):
    """A dual-stack endpoint whose policy names only IPv4 CIDRs reaches a dual-stack peer over
    IPv4 but not over IPv6, and the other way round; 0.0.0.0/0 and ::/0 stay in their family."""
    a = t6.pods[0]
    peer6 = f"fd00:253:{uuid.uuid4().int % 0xFFFF:x}::1"
    peer4 = f"10.250.{free_octets(1)[0]}.1"
    with lo_servers(peer4, peer6) as (port4, port6):
        for rule, reach4 in [
            (f'toCIDR: ["{peer4}/32"]', True),
            (f'toCIDR: ["{peer6}/128"]', False),
            ('toCIDR: ["0.0.0.0/0"]', True),
            ('toCIDR: ["::/0"]', False),
        ]:
            _enforce(t6, rule)
            assert _ok(a, peer4, port4, reach4) is reach4, rule
            assert _ok(a, peer6, port6, not reach4) is (not reach4), rule


def test_ciliums_icmp_example_allows_ping_and_ping6_only(t6):
    """examples/policies/l4/icmp.yaml, verbatim: egress ICMP type 8 (IPv4) and EchoRequest
    (IPv6) for app=myService; both pings pass, nothing else leaves the endpoint."""
    a, b, _, _ = t6.pods
    path = CILIUM_EXAMPLES / "examples__policies__l4__icmp.yaml"
    result = P.load_text(path.read_text(), str(path))
    assert result.ok, [str(d) for d in result.diagnostics]
    ns = "k8s:io.kubernetes.pod.namespace=default"
    endpoints = {
        "a": P.parse_labels(f"k8s:app=myService,{ns}"),
        "b": P.parse_labels(f"k8s:app=b,{ns}"),
    }
    ipcache = P.IPCache(t6.base_ipcache.items())
    compiled = P.compile_policy(result.rules, endpoints, P.IdentityAllocator(None), ipcache, 1)
    for name, p in (("a", a), ("b", b)):
        ipcache.upsert(f"{p.pod_ip6}/128", compiled.endpoints[name].identity)
        ipcache.upsert(f"{p.pod_ip}/32", compiled.endpoints[name].identity)
    t6.dp.ipcache_sync(dict(ipcache.items()))
    t6.dp.sync(compiled, {"a": t6.ids[0], "b": t6.ids[1]}, proxy_ports={})
    assert compiled.endpoints["a"].egress_enforced
    assert ping6_ok(a.netns, b.pod_ip6)
    assert ping4_ok(a.netns, b.pod_ip)
    assert not tcp6_ok(a.netns, b.pod_ip6, t6.servers6[1].port, timeout=BLOCKED)
    assert not tcp_ok(a.netns, b.pod_ip, t6.servers6[1].port, timeout=BLOCKED)
