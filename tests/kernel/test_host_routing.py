"""BPF host routing: pod to pod on one node is judged by the source's from_endpoint against both
ends' policies and handed into the destination's namespace (bpf_redirect_peer), not forwarded
by the host's stack nor sent through the destination's veth. Observed with a netfilter
forward-hook counter (it counts what the host's forwarding path carries), the host-side veths'
transmit counters, and the datapath's own counters and conntrack entries."""

from __future__ import annotations

import contextlib
import socket
import uuid

import pytest

from policies import INGRESS, PolicyEntry, PolicyKey
from redirect_bpf.structs import CT_MACS
from tests.kernel.conftest import drain, fresh_reader
from tests.kernel.netns import (
    BLOCKED,
    EchoServer,
    forward_counter,
    free_octets,
    link,
    pod,
    sock_in,
    tcp_ok,
    tx_packets,
    udp_ok,
)
from tests.kernel.netns6 import EchoServer6, free_subnets, pod6, tcp6_ok, udp6_ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(90)]

ALLOW = PolicyEntry(False, 0, ("test",))


def forwarded_at(dp, direction: str) -> int:
    return sum(
        p for (d, verdict, _), (p, _b) in dp.counters().items()
        if d == direction and verdict == "FORWARDED"
    )  # fmt: skip


def test_pod_to_pod_skips_the_host_stack_and_the_destination_still_enforces(clean):
    t = clean
    a, b, c = t.pods
    port = t.servers[1].port
    assert t.dp.host_routing()  # the default
    with forward_counter(a.pod_ip, b.pod_ip) as forwarded:
        ingress_before = forwarded_at(t.dp, "INGRESS")
        sent_before = {p.host_if: tx_packets(p.host_if) for p in (a, b)}
        assert tcp_ok(a.netns, b.pod_ip, port)
        assert udp_ok(a.netns, b.pod_ip, port)
        # A megabyte each way over one connection: every segment and ACK went around the stack.
        s = sock_in(a.netns)
        s.settimeout(5)
        s.connect((b.pod_ip, port))
        data = bytes(range(256)) * 4096
        s.sendall(data)
        got = bytearray()
        while len(got) < len(data):
            got += s.recv(65536)
        s.close()
        assert bytes(got) == data
        # Only each flow's first packet (two SYNs, one datagram) went through the host's stack
        # and B's veth: B had not yet shown its MACs on those flows.
        assert forwarded() <= 3
        # ... the rest went through neither veth's host end (bpf_redirect_peer skips their
        # transmit; a neighbour probe may pass there) ...
        assert tx_packets(a.host_if) - sent_before[a.host_if] <= 2
        assert tx_packets(b.host_if) - sent_before[b.host_if] <= 5
        # ... and B's ingress policy judged every packet (in A's program run).
        assert forwarded_at(t.dp, "INGRESS") - ingress_before > 30

        # B's ingress policy admits only C: A's SYN, allowed by A's egress, dies at B's ingress.
        t.dp.sync_endpoint(
            t.ids[1],
            {PolicyKey(t.identities[2], INGRESS, 0, 0, 0): ALLOW},
            ingress_enforced=True,
            egress_enforced=False,
        )
        reader = fresh_reader(t.dp)
        try:
            assert not tcp_ok(a.netns, b.pod_ip, port, timeout=BLOCKED)
            assert tcp_ok(c.netns, b.pod_ip, port)
            flows = drain(reader)
        finally:
            reader.stop()
        drops = [f for f in flows if f["verdict"] == "DROPPED"]
        assert drops and drops[0]["traffic_direction"] == "INGRESS"
        assert drops[0]["source"]["ip"] == a.pod_ip


def mac_of(dev: str, netns: str | None = None) -> bytes:
    return bytes.fromhex(link(dev, netns)["address"].replace(":", ""))


def test_handed_over_packets_are_addressed_to_the_pod(clean):
    """A packet handed into a pod carries the MACs the pod's veth would have put there: to the
    pod's own MAC from its veth's host side (a bridge or a VM inside the pod takes only those),
    not the sender's."""
    t = clean
    a, b, _ = t.pods
    pod_mac, host_mac = mac_of(b.pod_if, b.netns), mac_of(b.host_if)
    capture = sock_in(b.netns, socket.SOCK_RAW, socket.htons(0x0800), family=socket.AF_PACKET)
    capture.bind((b.pod_if, 0))
    capture.settimeout(0.5)
    try:
        s = sock_in(a.netns, socket.SOCK_DGRAM)
        s.settimeout(2)
        sent = tx_packets(b.host_if)
        for i in range(20):
            s.sendto(b"mac %d" % i, (b.pod_ip, t.servers[1].port))
            s.recvfrom(100)  # the echo: B's first answer shows B's MACs on this flow
        s.close()
        through_veth = tx_packets(b.host_if) - sent
        frames = []
        with contextlib.suppress(TimeoutError):
            while True:
                frames.append(capture.recv(2048))
    finally:
        capture.close()
    src, dst = socket.inet_aton(a.pod_ip), socket.inet_aton(b.pod_ip)
    to_b = [f for f in frames if f[12:14] == b"\x08\x00" and f[26:30] == src and f[30:34] == dst]
    assert len(to_b) >= 20, len(to_b)
    assert all(f[0:6] == pod_mac and f[6:12] == host_mac for f in to_b), [
        (f[0:6].hex(), f[6:12].hex()) for f in to_b if f[0:6] != pod_mac or f[6:12] != host_mac
    ]
    assert through_veth <= 3  # the first datagram, a neighbour probe: the rest were handed over


def test_legacy_host_routing_forwards_through_the_stack(clean):
    t = clean
    a, b, _ = t.pods
    port = t.servers[1].port
    t.dp.set_host_routing(False)
    try:
        assert not t.dp.host_routing()
        with forward_counter(a.pod_ip, b.pod_ip) as forwarded:
            assert tcp_ok(a.netns, b.pod_ip, port)
            assert udp_ok(a.netns, b.pod_ip, port)
            assert forwarded() >= 6  # SYN, SYN-ACK, ACK, data both ways, UDP both ways
    finally:
        t.dp.set_host_routing(True)


def test_both_ends_remember_where_their_packets_go(clean):
    t = clean
    a, b, _ = t.pods
    assert udp_ok(a.netns, b.pod_ip, t.servers[1].port)
    ifindex = {p.host_if: socket.if_nametoindex(p.host_if) for p in (a, b)}
    entries = {k.ifindex: e for k, e in t.dp.conntrack() if k.ifindex in ifindex.values()}
    # A's entry (its egress step) sends A's packets to B's veth; B's (keyed by B's veth, made
    # by the ingress step of the same program run) learned A's veth from B's answer.
    assert entries[ifindex[a.host_if]].deliver_ifindex == ifindex[b.host_if]
    assert entries[ifindex[b.host_if]].deliver_ifindex == ifindex[a.host_if]
    gen = t.dp.config().ep_gen
    assert entries[ifindex[a.host_if]].deliver_gen == gen


def test_an_address_taken_over_by_a_new_endpoint_is_delivered_to_it():
    """A flow's remembered veth is looked up again when an endpoint changes: the same UDP
    tuple reaches the endpoint that now holds the address, not the deleted veth."""
    from redirect_bpf.datapath import Datapath

    o = free_octets(2)
    dp = Datapath(f"/sys/fs/bpf/l7proxy/test-{uuid.uuid4().hex[:8]}", node="test")
    try:
        with pod(o[0]) as a:
            dp.attach_endpoint(a.host_if, 301, 3001, a.pod_ip)
            s = sock_in(a.netns, socket.SOCK_DGRAM)
            s.settimeout(3)
            try:
                with pod(o[1]) as b:
                    dp.attach_endpoint(b.host_if, 302, 3002, b.pod_ip)
                    srv = EchoServer(b.netns, b.pod_ip)
                    port = srv.port
                    try:
                        s.sendto(b"one", (b.pod_ip, port))
                        assert s.recvfrom(16)[0] == b"one"
                    finally:
                        srv.close()
                    dp.detach_endpoint(b.host_if)
                with pod(o[1]) as b2:  # the same address on a new veth
                    assert b2.pod_ip == b.pod_ip and b2.host_if != b.host_if
                    dp.attach_endpoint(b2.host_if, 303, 3003, b2.pod_ip)
                    srv = EchoServer(b2.netns, b2.pod_ip, port)
                    try:
                        s.sendto(b"two", (b2.pod_ip, port))
                        assert s.recvfrom(16)[0] == b"two"
                    finally:
                        srv.close()
                    a_if = socket.if_nametoindex(a.host_if)
                    (entry,) = [e for k, e in dp.conntrack() if k.ifindex == a_if]
                    assert entry.deliver_ifindex == socket.if_nametoindex(b2.host_if)
            finally:
                s.close()
    finally:
        dp.destroy()


def test_ipv6_pod_to_pod_skips_the_host_stack():
    from redirect_bpf.datapath import Datapath

    subnets, octets = free_subnets(2), free_octets(2)
    dp = Datapath(f"/sys/fs/bpf/l7proxy/test-{uuid.uuid4().hex[:8]}", node="test")
    try:
        with pod6(subnets[0], octets[0]) as a, pod6(subnets[1], octets[1]) as b:
            dp.attach_endpoint(a.host_if, 401, 4001, a.pod_ip, a.pod_ip6)
            dp.attach_endpoint(b.host_if, 402, 4002, b.pod_ip, b.pod_ip6)
            dp.sync_endpoint(
                402,
                {PolicyKey(4001, INGRESS, 0, 0, 0): ALLOW},
                ingress_enforced=True,
                egress_enforced=False,
            )
            srv = EchoServer6(b.netns, b.pod_ip6)
            try:
                with forward_counter(a.pod_ip6, b.pod_ip6) as forwarded:
                    assert tcp6_ok(a.netns, b.pod_ip6, srv.port)
                    assert udp6_ok(a.netns, b.pod_ip6, srv.port)
                    # Each flow's first packets go through the stack until the destination has
                    # shown its MACs on the flow (3 for the first connection here, 1 each after).
                    first = forwarded()
                    assert first <= 5
                    for _ in range(5):
                        assert tcp6_ok(a.netns, b.pod_ip6, srv.port)
                    assert forwarded() - first <= 5  # one SYN each: the rest was handed over
                    assert all(e.flags & CT_MACS for _, e in dp.conntrack6())
                    b_if = socket.if_nametoindex(b.host_if)
                    entries = [e for k, e in dp.conntrack6() if k.ifindex != b_if]
                    assert any(e.deliver_ifindex == b_if for e in entries)
                dp.set_host_routing(False)
                with forward_counter(a.pod_ip6, b.pod_ip6) as forwarded:
                    assert tcp6_ok(a.netns, b.pod_ip6, srv.port)
                    assert forwarded() > 0
            finally:
                srv.close()
    finally:
        dp.destroy()
