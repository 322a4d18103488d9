"""IPv6 and dual stack without the kernel (issue 17): the agent's IPv6 pool, the store's IPv6
addresses, what the world entities and the family-wide CIDRs select, and events with IPv6
addresses."""

from __future__ import annotations

import ctypes as ct
import ipaddress
import textwrap

import pytest

import policies as P
from l7proxy.agent.ipam import DEFAULT_POOL6, IPPool
from l7proxy.agent.store import EndpointRow, Store
from l7proxy.commands.agent import pool6_of
from redirect_bpf import events, ipcache, structs


def test_ipv6_pool_has_a_router_and_allocates_after_it():
    pool = IPPool("fd00:10:200::/64", 6)
    assert pool.router == "fd00:10:200::1"
    assert pool.allocate([]) == "fd00:10:200::2"
    assert pool.allocate(["fd00:10:200::2"]) == "fd00:10:200::3"
    assert pool.validate("fd00:10:200::99", []) == "fd00:10:200::99"
    with pytest.raises(ValueError, match="router"):
        pool.validate("fd00:10:200::1", [])
    with pytest.raises(ValueError, match="IPv6 network of /126"):
        IPPool("10.0.0.0/8", 6)
    with pytest.raises(ValueError, match="IPv4 network"):
        IPPool("fd00::/64")
    assert pool6_of("default") == DEFAULT_POOL6 and pool6_of("") == ""
    assert ipaddress.ip_network(DEFAULT_POOL6).is_private  # a ULA prefix


def test_store_keeps_an_endpoints_ipv6_address(tmp_path):
    store = Store(tmp_path / "state.db")
    dual = EndpointRow("web", "p-web", "l7a", "10.251.0.2", 32, (), 256, 1.0, ip6="fd00::2")
    single = EndpointRow("db", "p-db", "l7b", "10.251.0.3", 32, (), 257, 1.0)
    store.add_endpoint(dual, {})
    store.add_endpoint(single, {})
    store.close()
    again = Store(tmp_path / "state.db")
    assert {e.name: e.ip6 for e in again.endpoints()} == {"web": "fd00::2", "db": ""}
    assert again.endpoint("web").to_json()["ip6"] == "fd00::2"
    again.delete_endpoint("web")
    assert again.get("endpoint_ipv6") == {}


def _selected(peer: str) -> set[int]:
    text = textwrap.dedent(
        f"""
        apiVersion: cilium.io/v2
        kind: CiliumNetworkPolicy
        metadata: {{name: p, namespace: default}}
        spec:
          endpointSelector: {{matchLabels: {{app: a}}}}
          egress:
          - {peer}
        """
    )
    result = P.load_text(text, "p.yaml")
    assert result.ok, [str(d) for d in result.diagnostics]
    eps = {"a": P.parse_labels("k8s:app=a,k8s:io.kubernetes.pod.namespace=default")}
    compiled = P.compile_policy(result.rules, eps, P.IdentityAllocator(None), P.IPCache(), 1)
    return {k.identity for k in compiled.endpoints["a"].map_state}


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        ("toEntities: [world-ipv6]", {P.WORLD_IPV6}),
        ("toEntities: [world-ipv4]", {P.WORLD, P.WORLD_IPV4}),
        ("toEntities: [world]", {P.WORLD, P.WORLD_IPV4, P.WORLD_IPV6}),
        ('toCIDR: ["::/0"]', {P.WORLD_IPV6}),
        ('toCIDR: ["0.0.0.0/0"]', {P.WORLD, P.WORLD_IPV4}),
    ],
)
def test_world_entities_and_default_routes_stay_in_their_family(peer, expected):
    """The datapath gives an unknown IPv4 peer 2 and an unknown IPv6 peer 10: world-ipv6 must
    not select 2, or an IPv6-only rule would open IPv4."""
    # (a CIDR rule also selects its own CIDR identity, in the local scope)
    reserved = {n for n in _selected(peer) if n < 256}  # reserved identities
    assert reserved == expected


def test_unknown_ipv6_is_world_ipv6_in_the_ipcache_and_the_engine():
    assert P.IPCache().lookup("2001:db8::1") == P.WORLD_IPV6
    assert P.IPCache().lookup("192.0.2.1") == P.WORLD
    assert structs.IDENTITY_WORLD_IPV6 == P.WORLD_IPV6
    k = ipcache.key("fd00:1::/48")
    assert isinstance(k, structs.Ipcache6Key) and k.prefixlen == 48
    assert ipcache.cidr_of(k) == "fd00:1::/48"
    assert ipcache.cidr_of(ipcache.key("10.1.0.0/16")) == "10.1.0.0/16"


def test_an_ipv6_event_record_becomes_a_flow_with_ipv6_addresses():
    assert ct.sizeof(structs.FlowEvent6) == ct.sizeof(structs.FlowEvent) + 32 == 80
    e = structs.FlowEvent6()
    e.base.proto, e.base.verdict, e.base.reason = 58, 1, 1
    e.base.dport = 128 << 8  # network order: type 128
    e.saddr6 = ipcache.addr6("fd00::2")
    e.daddr6 = ipcache.addr6("fd00::3")
    flow = events.to_flow(e)
    assert (flow["source"]["ip"], flow["destination"]["ip"]) == ("fd00::2", "fd00::3")
    assert flow["l4"] == {"ICMPv6": {"type": 128}}
    assert flow["drop_reason_desc"] == "POLICY_DENIED"


def test_event_addresses_read_as_the_agent_writes_them():
    """The reader formats addresses with inet_ntop/inet_ntoa (fast), but must give the same text
    as ipaddress, which the agent's tables are keyed by: also in ::/80, where glibc would write
    a dotted quad (::ffff:1.2.3.4, ::0.1.0.2) and ipaddress does not."""
    import socket

    for text in (
        "fd00::5", "2001:db8:0:1:1:1:1:1", "2001:db8::1:0:0:1", "1::", "::", "::1", "::1:2",
        "::ffff:1.2.3.4", "::1.2.3.4", "64:ff9b::1.2.3.4", "fe80::1:0:0:0", "0:0:1::",
    ):  # fmt: skip
        addr = ipaddress.IPv6Address(text)
        assert events._ip6(ipcache.addr6(text)) == str(addr), text
    for text in ("10.200.0.5", "0.0.0.1", "255.255.255.255", "192.168.1.0"):
        be = int.from_bytes(socket.inet_aton(text), "little")  # a __be32 as ctypes reads it
        assert events._ip(be) == text


def test_in_cluster_answers_as_ipaddress_does():
    """in_cluster compares integers against CIDRs parsed once; the answer must be ipaddress's,
    for both families, mixed families, IPv4-mapped addresses and a scoped one."""
    from l7proxy.cluster.ipam import in_cluster

    cidrs = [("10.252.0.0/16", "fd00:10:252::/48"), ("10.252.0.0/16", ""), ("", "fd00::/8"),
             ("", ""), ("0.0.0.0/0", "::ffff:0:0/96")]  # fmt: skip
    addrs = ["10.252.2.5", "10.253.0.1", "10.252.255.255", "fd00:10:252:2::5", "fd00:10:253::1",
             "::ffff:10.252.2.5", "fe80::1%eth0", "::", "0.0.0.0"]  # fmt: skip
    for pair in cidrs:
        for ip in addrs:
            addr = ipaddress.ip_address(ip)
            expected = any(c and addr in ipaddress.ip_network(c) for c in pair)
            assert in_cluster(ip, *pair) == expected, (ip, pair)
    with pytest.raises(ValueError):
        in_cluster("not-an-address", "10.252.0.0/16")


def test_ipcache_lookup_by_text_object_or_cached_text_gives_one_answer():
    """IPCache.lookup caches the parsed text of an address; objects and text, a first and a
    repeated lookup, an IPv4-mapped IPv6 address and a bad one behave as before."""
    cache = P.IPCache([("10.0.0.0/8", 300), ("fd00::/64", 301), ("fd00::5/128", 302)])
    for _ in range(2):
        assert cache.lookup("10.1.2.3") == cache.lookup(ipaddress.ip_address("10.1.2.3")) == 300
        assert cache.lookup("fd00::5") == cache.lookup(ipaddress.ip_address("fd00::5")) == 302
        assert cache.lookup_prefix("fd00::6") == (301, "fd00::/64")
        assert cache.lookup("::ffff:10.1.2.3") == P.WORLD_IPV6  # IPv6, not the IPv4 /8
        assert cache.lookup_prefix("11.0.0.1") == (P.WORLD, None)
    with pytest.raises(ValueError):
        cache.lookup("10.1.2.300")


def test_event_times_share_the_formatted_second():
    import datetime as dt

    for ts in (1_700_000_000_123_456_789, 1_700_000_000_999_999_999, 1_700_000_001_000_000_001):
        secs, nanos = divmod(ts, 1_000_000_000)
        wall = dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        assert events._rfc3339(ts) == f"{wall}.{nanos:09d}Z"


def test_policy_trace_with_ipv6_destinations(capsys, tmp_path):
    """`policy trace --dst reserved:world --dst-ip` with IPv6 addresses: CIDR with except, and
    world-ipv6 selecting IPv6 only."""
    import json

    from l7proxy.cli import main

    pol = tmp_path / "egress.yaml"
    pol.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: e}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: crawler}}\n  egress:\n"
        "  - toCIDRSet: [{cidr: 'fd00:1::/48', except: ['fd00:1:0:9::/64']}]\n"
        "  - toEntities: [world-ipv4]\n    toPorts: [{ports: [{port: '80', protocol: TCP}]}]\n"
    )

    def trace(ip: str, port: str = "443") -> dict:
        argv = ["policy", "trace", "-p", str(pol), "--src", "app=crawler"]
        argv += ["--dst", "reserved:world", "--dst-ip", ip, "--dport", port, "-o", "json"]
        code = main(argv)
        out = capsys.readouterr()
        assert code == 0, out.err
        return json.loads(out.out)

    assert trace("fd00:1:0:2::5")["verdict"] == "ALLOWED"
    assert trace("fd00:1:0:9::5")["verdict"] == "DENIED"  # the except
    unknown = trace("2001:db8::1", "80")
    assert unknown["egress"]["peer_identity"] == P.WORLD_IPV6
    assert unknown["verdict"] == "DENIED"  # world-ipv4 does not cover IPv6
    assert trace("192.0.2.1", "80")["verdict"] == "ALLOWED"
