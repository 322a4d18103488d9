"""L3/L4 enforcement in tc BPF on three real endpoints (namespaces + veths), TCP and UDP."""

from __future__ import annotations

import socket
import time

import pytest

from policies import EGRESS, INGRESS, PolicyEntry, PolicyKey
from redirect_bpf.structs import IDENTITY_HOST, IDENTITY_WORLD
from tests.kernel.conftest import drain, fresh_reader, host_addresses
from tests.kernel.netns import BLOCKED, EchoServer, in_netns, sh, sock_in, tcp_ok, udp_ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(60)]

TCP, UDP = 6, 17
ALLOW = PolicyEntry(False, 0, ("test",))
DENY = PolicyEntry(True, 0, ("test",))


def K(identity, direction, proto=0, port=0, prefix_len=0):  # noqa: N802
    return PolicyKey(identity, direction, proto, port, prefix_len)


def test_l3_allow_by_identity_then_default_deny(clean):
    t = clean
    a, b, c = t.pods
    port = t.servers[1].port
    reader = fresh_reader(t.dp)
    try:
        # No policy on B: everyone reaches it.
        assert tcp_ok(c.netns, b.pod_ip, port)
        t.dp.sync_endpoint(
            t.ids[1],
            {K(t.identities[0], INGRESS): ALLOW},
            ingress_enforced=True,
            egress_enforced=False,
        )
        assert tcp_ok(a.netns, b.pod_ip, port)
        assert udp_ok(a.netns, b.pod_ip, port)
        assert not tcp_ok(c.netns, b.pod_ip, port, timeout=BLOCKED)
        assert not udp_ok(c.netns, b.pod_ip, port, timeout=BLOCKED)
        flows = drain(reader)
    finally:
        reader.stop()
    drops = [f for f in flows if f["verdict"] == "DROPPED"]
    assert drops, flows
    d = drops[0]
    assert d["drop_reason_desc"] == "POLICY_DENIED"
    assert d["traffic_direction"] == "INGRESS"
    assert d["source"]["identity"] == t.identities[2]
    assert d["source"]["ip"] == c.pod_ip
    assert d["destination"]["identity"] == t.identities[1]
    assert d["l4"]["TCP"]["destination_port"] == port
    assert d["policy_match"] is None
    allowed = [
        f
        for f in flows
        if f["verdict"] == "FORWARDED"
        and f["traffic_direction"] == "INGRESS"
        and f["source"]["identity"] == t.identities[0]
    ]
    assert allowed and allowed[0]["policy_match"]["kind"] == "L3"
    assert allowed[0]["policy_match"]["identity"] == t.identities[0]
    assert allowed[0]["event_type"] == "L3_L4" and allowed[0]["time"].endswith("Z")


def test_l4_ports_and_port_ranges(clean):
    t = clean
    a, b, _ = t.pods
    servers = [EchoServer(b.netns, b.pod_ip, p) for p in (8080, 9001, 9003, 9004)]
    try:
        # TCP 8080 exact from anyone; 9000-9003 (one /14 prefix) from A; UDP 9004 from anyone.
        state = {
            K(0, INGRESS, TCP, 8080, 16): ALLOW,
            K(t.identities[0], INGRESS, TCP, 9000, 14): ALLOW,
            K(0, INGRESS, UDP, 9004, 16): ALLOW,
        }
        t.dp.sync_endpoint(t.ids[1], state, ingress_enforced=True, egress_enforced=False)
        assert tcp_ok(a.netns, b.pod_ip, 8080)
        assert tcp_ok(a.netns, b.pod_ip, 9001)
        assert tcp_ok(a.netns, b.pod_ip, 9003)
        assert not tcp_ok(a.netns, b.pod_ip, 9004, timeout=BLOCKED)  # just outside the range
        assert not udp_ok(a.netns, b.pod_ip, 8080, timeout=BLOCKED)  # the port rule is TCP only
        assert udp_ok(a.netns, b.pod_ip, 9004)
        assert not tcp_ok(t.pods[2].netns, b.pod_ip, 9001, timeout=BLOCKED)  # range is for A only
    finally:
        for s in servers:
            s.close()


def test_deny_beats_allow(clean):
    t = clean
    a, b, c = t.pods
    extra = EchoServer(b.netns, b.pod_ip, 8081)
    reader = fresh_reader(t.dp)
    try:
        state = {
            K(t.identities[0], INGRESS): ALLOW,  # A: everything (L3-specific)
            K(0, INGRESS, TCP, 8081, 16): DENY,  # ...but nobody on TCP 8081 (L4-only deny)
            K(0, INGRESS, TCP): ALLOW,  # everyone: any TCP port
            K(t.identities[2], INGRESS, TCP): DENY,  # ...except C (L3 deny)
        }
        t.dp.sync_endpoint(t.ids[1], state, ingress_enforced=True, egress_enforced=False)
        assert tcp_ok(a.netns, b.pod_ip, t.servers[1].port)
        assert not tcp_ok(a.netns, b.pod_ip, 8081, timeout=BLOCKED)
        assert not tcp_ok(c.netns, b.pod_ip, t.servers[1].port, timeout=BLOCKED)
        flows = drain(reader)
    finally:
        reader.stop()
        extra.close()
    denies = [f for f in flows if f["verdict"] == "DROPPED"]
    by_src = {f["source"]["identity"]: f for f in denies}
    assert by_src[t.identities[0]]["drop_reason_desc"] == "POLICY_DENY"
    assert by_src[t.identities[0]]["policy_match"] == {
        "kind": "L4-only",
        "identity": 0,
        "direction": INGRESS,
        "proto": TCP,
        "port": 8081,
        "prefix_len": 16,
        "deny": True,
    }
    assert by_src[t.identities[2]]["drop_reason_desc"] == "POLICY_DENY"
    assert by_src[t.identities[2]]["policy_match"]["kind"] == "L3"


def test_cidr_with_except_world_and_host_egress(clean):
    t = clean
    a = t.pods[0]
    net = f"10.250.{t.spare_octet}"
    inside, excepted = f"{net}.1", f"{net}.129"
    cidr_id, except_id = (1 << 24) + 1, (1 << 24) + 2
    with host_addresses(f"{inside}/32", f"{excepted}/32"):
        servers = [EchoServer(None, ip) for ip in (inside, excepted)]
        host_server = EchoServer(None, a.host_ip)
        try:
            # toCIDRSet 10.250.N.0/24 except 10.250.N.128/25, as the policy engine compiles it:
            # the CIDR and the except get their own identities; only the CIDR one is allowed.
            t.dp.ipcache_upsert(f"{net}.0/24", cidr_id)
            t.dp.ipcache_upsert(f"{net}.128/25", except_id)
            t.dp.sync_endpoint(
                t.ids[0],
                {K(cidr_id, EGRESS): ALLOW},
                ingress_enforced=False,
                egress_enforced=True,
            )
            assert tcp_ok(a.netns, inside, servers[0].port)
            assert not tcp_ok(a.netns, excepted, servers[1].port, timeout=BLOCKED)
            assert not tcp_ok(
                a.netns, a.host_ip, host_server.port, timeout=BLOCKED
            )  # host not allowed
            # world: addresses the ipcache does not know
            t.dp.ipcache_delete(f"{net}.0/24")
            t.dp.ipcache_delete(f"{net}.128/25")
            assert t.dp.ipcache_lookup(inside) == IDENTITY_WORLD
            t.dp.sync_endpoint(
                t.ids[0],
                {K(IDENTITY_WORLD, EGRESS): ALLOW},
                ingress_enforced=False,
                egress_enforced=True,
            )
            assert tcp_ok(a.netns, inside, servers[0].port)
            assert not tcp_ok(a.netns, a.host_ip, host_server.port, timeout=BLOCKED)
            # host entity
            t.dp.sync_endpoint(
                t.ids[0],
                {K(IDENTITY_HOST, EGRESS, TCP): ALLOW},
                ingress_enforced=False,
                egress_enforced=True,
            )
            assert tcp_ok(a.netns, a.host_ip, host_server.port)
            assert not udp_ok(a.netns, a.host_ip, host_server.port, timeout=BLOCKED)
            assert not tcp_ok(a.netns, inside, servers[0].port, timeout=BLOCKED)
        finally:
            for s in (*servers, host_server):
                s.close()
            t.dp.ipcache_delete(f"{net}.0/24")
            t.dp.ipcache_delete(f"{net}.128/25")


def test_replies_pass_even_when_the_reverse_direction_is_denied(clean):
    t = clean
    a, b, _ = t.pods
    # B accepts from A but may not open anything itself (egress enforced, empty).
    t.dp.sync_endpoint(
        t.ids[1],
        {K(t.identities[0], INGRESS): ALLOW},
        ingress_enforced=True,
        egress_enforced=True,
    )
    assert tcp_ok(a.netns, b.pod_ip, t.servers[1].port)
    assert udp_ok(a.netns, b.pod_ip, t.servers[1].port)
    assert not tcp_ok(b.netns, a.pod_ip, t.servers[0].port, timeout=BLOCKED)


def test_established_flow_survives_unrelated_change_and_is_cut_when_denied(clean):
    t = clean
    a, b, c = t.pods
    allow_a = {K(t.identities[0], INGRESS, TCP): ALLOW}
    t.dp.sync_endpoint(t.ids[1], allow_a, ingress_enforced=True, egress_enforced=False)
    s = sock_in(a.netns)
    s.settimeout(5.0)
    s.connect((b.pod_ip, t.servers[1].port))
    try:
        s.sendall(b"one")
        assert s.recv(16) == b"one"
        # Unrelated change: allow C on UDP too. The flow is re-checked once and stays.
        stats = t.dp.sync_endpoint(
            t.ids[1],
            {**allow_a, K(t.identities[2], INGRESS, UDP): ALLOW},
            ingress_enforced=True,
            egress_enforced=False,
        )
        assert (stats.adds, stats.updates, stats.deletes) == (1, 0, 0)
        s.sendall(b"two")
        assert s.recv(16) == b"two"
        # A loses its allow: the next packet of the established flow is dropped.
        t.dp.sync_endpoint(
            t.ids[1],
            {K(t.identities[2], INGRESS, UDP): ALLOW},
            ingress_enforced=True,
            egress_enforced=False,
        )
        s.sendall(b"three")
        s.settimeout(1.0)
        with pytest.raises(TimeoutError):  # nothing comes back
            s.recv(16)
    finally:
        s.close()


def test_conntrack_tracks_tcp_state_and_gc_expires_entries(clean):
    t = clean
    a, b, _ = t.pods
    t.dp.set_config(ct_udp_s=1)
    try:
        assert udp_ok(a.netns, b.pod_ip, t.servers[1].port)
        assert tcp_ok(a.netns, b.pod_ip, t.servers[1].port)
        entries = t.dp.conntrack()
        udp = [(k, v) for k, v in entries if k.proto == UDP]
        tcp = [(k, v) for k, v in entries if k.proto == TCP]
        # one entry per endpoint (A's veth, B's veth), each shared by both directions
        assert {(k.ifindex, v.direction) for k, v in udp} == {
            (socket.if_nametoindex(a.host_if), EGRESS),
            (socket.if_nametoindex(b.host_if), INGRESS),
        }
        a_ip = int.from_bytes(socket.inet_aton(a.pod_ip), "little")  # as the kernel stores it
        assert all(v.orig_saddr == a_ip for _, v in udp)  # A initiated
        assert tcp and all(v.flags & 2 for _, v in tcp)  # CT_SEEN_REPLY
        time.sleep(0.3)
        # Both ends closed: FIN seen, the entries wait out the short close timeout.
        assert all(v.flags & 4 for k, v in t.dp.conntrack() if k.proto == TCP)  # CT_CLOSING
        stop = t.dp.start_gc(interval=0.2)  # what the agent runs (every 30 s by default)
        deadline = time.monotonic() + 5
        while [k for k, _ in t.dp.conntrack() if k.proto == UDP] and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        left = t.dp.conntrack()
        assert not [k for k, _ in left if k.proto == UDP]
        assert [k for k, _ in left if k.proto == TCP]  # 10 s close timeout: not yet expired
        assert t.dp.ct_gc(now_ns=time.monotonic_ns() + 11 * 10**9) == len(left)
    finally:
        t.dp.set_config(ct_udp_s=60)


def test_per_cpu_counters_count_verdicts(clean):
    t = clean
    a, b, c = t.pods
    before = t.dp.counters()
    t.dp.sync_endpoint(
        t.ids[1],
        {K(t.identities[0], INGRESS): ALLOW},
        ingress_enforced=True,
        egress_enforced=False,
    )
    assert tcp_ok(a.netns, b.pod_ip, t.servers[1].port)
    assert not tcp_ok(c.netns, b.pod_ip, t.servers[1].port, timeout=BLOCKED)
    after = t.dp.counters()

    def delta(key):
        return after.get(key, (0, 0))[0] - before.get(key, (0, 0))[0]

    assert delta(("INGRESS", "DROPPED", "POLICY_DENIED")) >= 1
    assert delta(("INGRESS", "FORWARDED", "NEW_FLOW")) >= 1
    assert delta(("INGRESS", "FORWARDED", "CT_ESTABLISHED")) >= 2
    assert delta(("EGRESS", "FORWARDED", "CT_REPLY")) >= 2


def test_ipv6_cannot_bypass_an_enforced_ipv4_policy(clean):
    t = clean
    a = t.pods[0]
    sh("ip", "addr", "add", "fd00:250::1/64", "dev", a.host_if, "nodad")
    a.run("ip", "addr", "add", "fd00:250::2/64", "dev", a.pod_if, "nodad")
    server = socket.create_server(("fd00:250::1", 0), family=socket.AF_INET6)
    port = server.getsockname()[1]

    def v6_ok(timeout=5.0):
        s = in_netns(a.netns, socket.socket, socket.AF_INET6, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(("fd00:250::1", port))
            return True
        except OSError:
            return False
        finally:
            s.close()

    try:
        assert v6_ok()  # no policy on A: IPv6 flows like IPv4
        t.dp.sync_endpoint(
            t.ids[0],
            {K(IDENTITY_WORLD, EGRESS): ALLOW},
            ingress_enforced=False,
            egress_enforced=True,
        )
        assert not v6_ok(BLOCKED)  # egress enforced (IPv4-only policy): IPv6 is dropped
    finally:
        server.close()
        sh("ip", "addr", "del", "fd00:250::1/64", "dev", a.host_if, check=False)


def test_flows_reach_an_asyncio_queue_from_the_reader_thread(clean):
    import asyncio

    from redirect_bpf.events import asyncio_callback

    t = clean
    a, b, _ = t.pods
    t.dp.sync_endpoint(
        t.ids[1],
        {K(t.identities[0], INGRESS): ALLOW},
        ingress_enforced=True,
        egress_enforced=False,
    )

    async def main():
        queue: asyncio.Queue = asyncio.Queue()
        reader = t.dp.events(on_flow=asyncio_callback(asyncio.get_running_loop(), queue))
        try:
            ok = await asyncio.to_thread(
                tcp_ok, t.pods[2].netns, b.pod_ip, t.servers[1].port, BLOCKED
            )
            assert not ok
            while True:  # skip any backlog from earlier tests
                flow = await asyncio.wait_for(queue.get(), 5)
                if flow["verdict"] == "DROPPED" and flow["source"]["ip"] == t.pods[2].pod_ip:
                    return flow
        finally:
            reader.stop()

    flow = asyncio.run(main())
    assert flow["drop_reason_desc"] == "POLICY_DENIED"
    assert flow["destination"]["identity"] == t.identities[1]
