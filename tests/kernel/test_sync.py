"""Map sync at scale: 10,000 MapState entries reach the kernel tries quickly, a one-rule change
writes exactly one entry, and a restarted agent's first sync of the same state writes nothing."""

from __future__ import annotations

import time
import uuid

import pytest

from policies import EGRESS, INGRESS, PolicyEntry, PolicyKey

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]

ALLOW = PolicyEntry(False, 0, ("scale",))


def test_sync_10000_entries_then_only_diffs():
    from redirect_bpf.datapath import Datapath

    pin = f"/sys/fs/bpf/l7proxy/sync-{uuid.uuid4().hex[:8]}"
    dp = Datapath(pin, node="sync")
    try:
        state = {
            PolicyKey(100_000 + i, INGRESS, 6, 1000 + i % 50_000, 16): ALLOW for i in range(9_990)
        }
        # ten entries with protocol "any" on a port: each is TCP, UDP and SCTP in the kernel
        state |= {PolicyKey(300 + i, EGRESS, 0, 443, 16): ALLOW for i in range(10)}
        gen = dp.config().policy_gen
        t0 = time.perf_counter()
        stats = dp.sync_endpoint(1, state, ingress_enforced=True, egress_enforced=True)
        elapsed = time.perf_counter() - t0
        assert stats.adds == 9_990 + 30 and stats.deletes == stats.updates == 0
        assert len(list(dp.maps["policy_allow"].keys())) == 10_020
        assert elapsed < 3.0  # target < 1 s, measured ~50 ms; loose here for a loaded CI box
        assert dp.config().policy_gen == gen + 1

        changed = dict(state)
        del changed[PolicyKey(100_000, INGRESS, 6, 1000, 16)]
        changed[PolicyKey(7, INGRESS, 17, 53, 16)] = PolicyEntry(True, 0, ("scale",))
        stats = dp.sync_endpoint(1, changed, ingress_enforced=True, egress_enforced=True)
        assert (stats.adds, stats.updates, stats.deletes) == (1, 0, 1)
        assert len(list(dp.maps["policy_deny"].keys())) == 1

        # l7 redirect port changes rewrite the value in place (an update, not add+delete)
        changed[PolicyKey(8, INGRESS, 6, 80, 16)] = PolicyEntry(False, 4, ("scale",))
        dp.sync_endpoint(1, changed, ingress_enforced=True, egress_enforced=True, proxy_ports={})
        stats = dp.sync_endpoint(
            1, changed, ingress_enforced=True, egress_enforced=True, proxy_ports={4: 15001}
        )
        assert (stats.adds, stats.updates, stats.deletes) == (0, 1, 0)

        # a restarted agent reads the tries back: the same state writes nothing
        dp.close()
        dp = Datapath(pin, node="sync")
        assert dp.reused
        gen = dp.config().policy_gen
        stats = dp.sync_endpoint(
            1, changed, ingress_enforced=True, egress_enforced=True, proxy_ports={4: 15001}
        )
        assert stats.touched == 0
        assert dp.config().policy_gen == gen
    finally:
        dp.destroy()


def test_packed_entries_are_the_ctypes_structs():
    from redirect_bpf import sync

    state = {
        PolicyKey(0, INGRESS, 0, 0, 0): PolicyEntry(False, 0, ()),
        PolicyKey(5, EGRESS, 0, 443, 16): PolicyEntry(False, 3, ()),  # any proto + port
        PolicyKey(6, INGRESS, 6, 9000, 14): PolicyEntry(True, 0, ()),
        PolicyKey(1 << 24, EGRESS, 17, 53, 16): PolicyEntry(False, 9, ()),  # no port known
        PolicyKey(7, INGRESS, 1, 8, 16): PolicyEntry(False, 0, ()),  # ICMP echo
    }
    ports = {3: 15001}
    want = {}
    for key, entry in state.items():
        value = bytes(sync.kernel_value(key, entry, ports))
        for k in sync.kernel_keys(42, key):
            want[(sync.DENY if entry.deny else sync.ALLOW, bytes(k))] = value
    assert sync.desired_entries(42, state, ports) == want
    assert len(want) == 7


def test_conntrack_gc_at_scale_removes_exactly_the_expired_entries():
    from redirect_bpf import structs
    from redirect_bpf.datapath import Datapath

    dp = Datapath(f"/sys/fs/bpf/l7proxy/gc-{uuid.uuid4().hex[:8]}", node="gc")
    try:
        ct = dp.maps["conntrack"]
        now = time.monotonic_ns()
        pairs = []
        for i in range(100_000):
            key = structs.CtKey(addr_lo=i, addr_hi=1, port_lo=2, port_hi=3, proto=6, ifindex=9)
            expires = now - 1 if i % 2 else now + 3600 * 10**9
            pairs.append((bytes(key), bytes(structs.CtEntry(expires_ns=expires))))
        ct.put_many_raw(pairs)
        t0 = time.perf_counter()
        assert dp.ct_gc(now_ns=now) == 50_000
        elapsed = time.perf_counter() - t0
        left = list(ct.keys())
        assert len(left) == 50_000 and all(k.addr_lo % 2 == 0 for k in left)
        assert elapsed < 5.0  # ~0.13 s measured: batch lookups and one batch delete
    finally:
        dp.destroy()
