"""NodePort's struct mirrors (redirect_bpf/nodeport_structs.py) match what bcc compiled; the
programs use the socket LB's and the datapath's maps themselves (the pinned ones, not copies);
the pins re-open without compiling; the frontend writer writes only the diff; its filters sit
beside other filters on a device and leave alone what is not theirs."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from redirect_bpf import bpfsys, loader, tc
from redirect_bpf import nodeport_structs as S
from redirect_bpf.nodeport import FILTER_NAME, NodePort, NpFrontend
from redirect_bpf.sock_lb import SockLB
from tests.kernel.layouts import assert_map_mirrors

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def fresh():
    pin_dir = Path(f"/sys/fs/bpf/l7np-layout-{uuid.uuid4().hex[:8]}")
    dp = loader.load(pin_dir)
    lb = SockLB(pin_dir)
    np_ = None
    try:
        np_ = NodePort(pin_dir)
        assert np_.bpf is not None and not np_.reused
        yield np_
    finally:
        if np_ is not None:
            np_.destroy()
        lb.destroy()
        dp.close()
        loader.unpin(pin_dir)


@pytest.mark.parametrize("name", sorted(S.MAPS))
def test_map_structs_mirror_the_c(fresh, name):
    key, value = S.MAPS[name]
    table = fresh.bpf[name.encode()]
    assert_map_mirrors(key, value, table, name)


@pytest.mark.parametrize("name", S.SHARED_MAPS)
def test_shared_maps_are_the_pinned_ones(fresh, name):
    own = bpfsys.fdinfo(fresh.bpf[name.encode()].get_fd())["map_id"]
    fd = bpfsys.obj_get(fresh.pin_dir / f"map_{name}")
    try:
        assert bpfsys.fdinfo(fd)["map_id"] == own
    finally:
        os.close(fd)


def test_frontends_diff_and_reopen(fresh):
    web = NpFrontend("10.96.98.1", 80, "TCP", node_port=30080)
    dns = NpFrontend("10.96.98.2", 53, "UDP", dsr=True)
    assert fresh.sync([web, dns]) == 3  # web's VIP and node port, dns's VIP
    assert fresh.sync([web, dns]) == 0
    key = S.FrontendKey(0, S.be16(30080), 6, 0)
    value = fresh.maps["np_frontends"].get(key)
    assert (S.ip_of(value.vip), S.port_of(value.vport), value.flags) == ("10.96.98.1", 80, 0)
    assert fresh.sync([NpFrontend(web.vip, 80, "TCP", node_port=30080, dsr=True)]) == 3
    assert fresh.maps["np_frontends"].get(key).flags == S.NP_FRONTEND_DSR
    again = NodePort(fresh.pin_dir)
    try:
        assert again.reused and again.bpf is None
        assert again.frontends() == 2
    finally:
        again.close()
    assert fresh.sync([]) == 2 and fresh.frontends() == 0


def test_filters_go_first_and_leave_others_alone(fresh):
    link = f"l7np{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", f"{link}p"],
                   check=True)  # fmt: skip
    try:
        subprocess.run(["ip", "addr", "add", "192.0.2.7/32", "dev", link], check=True)
        other = loader.open_pinned(fresh.pin_dir)
        try:
            tc.attach_ingress(link, ingress_fd=other.progs["from_netdev"], name="l7proxy-node")
        finally:
            other.close()
        fresh.attach(link, "192.0.2.7")
        assert S.ip_of(fresh.maps["np_config"].get(S.u32(0)).node_ip) == "192.0.2.7"
        fresh.attach(link, "192.0.2.7")  # a restarted agent replaces its own, adds none
        names = _filters(link)
        assert names[tc.INGRESS] == [(1, FILTER_NAME), (names[tc.INGRESS][1][0], "l7proxy-node")]
        assert names[tc.EGRESS] == [(1, FILTER_NAME)]
        fresh.detach()
        assert _filters(link) == {tc.INGRESS: [names[tc.INGRESS][1]], tc.EGRESS: []}
    finally:
        subprocess.run(["ip", "link", "del", link], check=False)


def _filters(link: str) -> dict[str, list[tuple[int, str]]]:
    with IPRoute() as ipr:
        idx = ipr.link_lookup(ifname=link)[0]
        out = {}
        for parent in (tc.INGRESS, tc.EGRESS):
            found = []
            for f in ipr.get_filters(idx, parent=parent):
                opts = f.get_attr("TCA_OPTIONS")
                if f.get_attr("TCA_KIND") == "bpf" and opts is not None:
                    found.append((f["info"] >> 16, opts.get_attr("TCA_BPF_NAME").split(":")[0]))
            out[parent] = sorted(found)
        return out


def test_gc_removes_closed_idle_flows_and_their_answers_mapping(fresh):
    """np_ct entries the client closed (FIN/RST seen) and idle for the timeout go, with the
    np_rev entry of a SNATed or local flow; open flows, recent closes and UDP stay."""
    node, client, backend = S.be32("192.0.2.7"), S.be32("198.51.100.9"), S.be32("10.0.1.5")
    fresh.set_node_ip("192.0.2.7")
    ct_map, rev_map = fresh.maps["np_ct"], fresh.maps["np_rev"]
    now = 100 * 10**9
    cases = {  # client port -> (ct flags, seconds idle, removed?)
        1001: (S.NP_CT_SNAT | S.NP_CT_CLOSING, 11, True),
        1002: (S.NP_CT_LOCAL | S.NP_CT_CLOSING, 11, True),
        1003: (S.NP_CT_SNAT | S.NP_CT_CLOSING, 3, False),  # closed a moment ago
        1004: (S.NP_CT_SNAT, 60, False),  # open (idle: LRU's business)
    }
    revs = {}
    for port, (flags, idle, _) in cases.items():
        key = S.Tuple(client, node, S.be16(port), S.be16(30080), 6)
        nat = S.be16(port + 5000)
        ct_map.put(key, S.Conntrack(backend, S.be16(8080), nat, 1, flags, 0, 0, now - idle * 10**9))
        if flags & S.NP_CT_SNAT:
            rkey = S.Tuple(backend, node, S.be16(8080), nat, 6)
        else:
            rkey = S.Tuple(backend, client, S.be16(8080), S.be16(port), 6)
        rev_map.put(rkey, S.Rev(node, S.be16(30080), S.be16(port), client, S.NP_REV_SNAT))
        revs[port] = rkey
    try:
        assert fresh.gc(now_ns=now) == 2
        for port, (_, _, removed) in cases.items():
            key = S.Tuple(client, node, S.be16(port), S.be16(30080), 6)
            assert (ct_map.get(key) is None) == removed, port
            assert (rev_map.get(revs[port]) is None) == removed, port
    finally:
        for port in cases:
            ct_map.delete(S.Tuple(client, node, S.be16(port), S.be16(30080), 6))
            rev_map.delete(revs[port])
