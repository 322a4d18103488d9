"""The C policy lookup agrees with the policy engine's MapState.lookup (Cilium's precedence: deny
first, L3-specific over L4-only, longest port prefix, specific protocol over any) on random
MapStates, packet by packet through BPF_PROG_TEST_RUN of the real tc programs."""

from __future__ import annotations

import random
import socket
import struct
import uuid

import pytest

from policies import EGRESS, INGRESS, MapState, PolicyEntry, PolicyKey
from redirect_bpf import bpfsys, structs

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]

TC_ACT_OK, TC_ACT_SHOT = 0, 2
EP_ID, EP_IDENTITY, EP_IP = 77, 4242, "10.77.0.1"
PEERS = [5001, 5002, 5003, 5004]  # identities of peers 10.77.1.<i>


def packet(src: str, dst: str, proto: int, sport: int, dport: int) -> bytes:
    if proto == 6:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    else:
        l4 = struct.pack("!HHHH", sport, dport, 8, 0)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), 0, 0, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + l4


def random_state(rng: random.Random) -> dict:
    state = {}
    for _ in range(rng.randint(3, 14)):
        identity = rng.choice([0, 0, *PEERS])
        direction = rng.choice([INGRESS, EGRESS])
        proto = rng.choice([0, 6, 6, 17])
        prefix = 0 if proto == 0 and rng.random() < 0.5 else rng.choice([0, 8, 12, 14, 15, 16])
        port = rng.choice([80, 443, 8080, 9000, 9003, 53]) & ((0xFFFF << (16 - prefix)) & 0xFFFF)
        roll = rng.random()
        entry = PolicyEntry(roll < 0.3, 0 if roll < 0.75 else rng.randint(1, 3), ("r",))
        state[PolicyKey(identity, direction, proto, port, prefix)] = entry
    return state


@pytest.fixture(scope="module")
def dp():
    from redirect_bpf.datapath import Datapath

    d = Datapath(f"/sys/fs/bpf/l7proxy/prec-{uuid.uuid4().hex[:8]}", node="prec")
    try:
        # A fake endpoint on lo: test runs see skb->ifindex 1.
        info = structs.EndpointInfo(endpoint_id=EP_ID, identity=EP_IDENTITY, ifindex=1)
        d.maps["ep_by_ifindex"].put(structs.u32(1), info)
        for i, ident in enumerate(PEERS):
            d.ipcache_upsert(f"10.77.1.{i + 1}/32", ident)
        yield d
    finally:
        d.destroy()


def no_proxy_drops(dp, direction: int) -> int:
    slot = (direction * 3 + structs.VERDICT_DROPPED) * structs.REASONS + structs.REASON_NO_PROXY
    return sum(c.packets for c in dp.maps["counters"].get(structs.u32(slot)))


@pytest.mark.parametrize("seed", range(6))
def test_kernel_lookup_matches_mapstate_lookup(dp, seed):
    rng = random.Random(seed)
    state = random_state(rng)
    ingress_enforced, egress_enforced = rng.random() < 0.8, rng.random() < 0.8
    dp.sync_endpoint(
        EP_ID, state, ingress_enforced=ingress_enforced, egress_enforced=egress_enforced
    )
    dp.maps["conntrack"].clear()
    engine = MapState(state)
    progs = dp.prog_fds
    sport = 20000
    outcomes = []
    for _ in range(150):
        sport += 1
        direction = rng.choice([INGRESS, EGRESS])
        peer_index = rng.randrange(len(PEERS) + 1)  # the last one is unknown: world
        peer_ip = f"10.77.1.{peer_index + 1}"
        peer_id = PEERS[peer_index] if peer_index < len(PEERS) else structs.IDENTITY_WORLD
        proto = rng.choice([6, 17])
        port = rng.choice([80, 81, 443, 8080, 8081, 9000, 9002, 9004, 53, 1234])
        entry = engine.lookup(peer_id, direction, proto, port)
        enforced = ingress_enforced if direction == INGRESS else egress_enforced
        if entry is None:
            want = "drop" if enforced else "pass"
        else:
            want = "drop" if entry.deny else ("redirect" if entry.l7_id else "pass")
        if direction == INGRESS:  # peer -> endpoint, seen by to_endpoint
            pkt, prog = packet(peer_ip, EP_IP, proto, sport, port), progs["to_endpoint"]
        else:
            pkt, prog = packet(EP_IP, peer_ip, proto, sport, port), progs["from_endpoint"]
        before = no_proxy_drops(dp, direction)
        code, _ = bpfsys.test_run_skb(prog, pkt)
        redirect_tried = no_proxy_drops(dp, direction) > before
        # No proxy listens in this test, so a redirect shows up as a "no proxy" drop.
        got = "redirect" if redirect_tried else ("pass" if code == TC_ACT_OK else "drop")
        assert code in (TC_ACT_OK, TC_ACT_SHOT)
        assert got == want, (direction, peer_id, proto, port, entry, sorted(state.items()))
        outcomes.append(got)
    print(seed, {o: outcomes.count(o) for o in set(outcomes)})
    assert len(set(outcomes)) >= 2  # the random cases really exercise more than one verdict


def test_reversed_tuple_syn_is_a_new_flow_not_a_reply(dp):
    peer_ip, peer_id = "10.77.1.1", PEERS[0]
    # The endpoint may open TCP to the peer; nobody may open anything to the endpoint.
    dp.sync_endpoint(
        EP_ID,
        {PolicyKey(peer_id, EGRESS, 6, 0, 0): PolicyEntry(False, 0, ("r",))},
        ingress_enforced=True,
        egress_enforced=True,
    )
    dp.maps["conntrack"].clear()
    progs = dp.prog_fds
    out = packet(EP_IP, peer_ip, 6, 40000, 5555)  # endpoint -> peer, SYN
    assert bpfsys.test_run_skb(progs["from_endpoint"], out)[0] == TC_ACT_OK
    # The same flow's reply (SYN-ACK would do, a plain ACK here) passes as a reply...
    reply = bytearray(packet(peer_ip, EP_IP, 6, 5555, 40000))
    reply[14 + 20 + 13] = 0x10  # ACK
    assert bpfsys.test_run_skb(progs["to_endpoint"], bytes(reply))[0] == TC_ACT_OK
    # ...but a bare SYN from the peer on the reversed tuple is a new inbound connection: denied.
    syn = packet(peer_ip, EP_IP, 6, 5555, 40000)
    assert bpfsys.test_run_skb(progs["to_endpoint"], syn)[0] == TC_ACT_SHOT
