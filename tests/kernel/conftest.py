"""Fixtures for the datapath kernel tests: a three-endpoint topology with a live Datapath."""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

import pytest

from tests.kernel.netns import EchoServer, Pod, free_octets, pod, sh


@dataclass
class Topology:
    dp: object
    pods: list[Pod]
    servers: list[EchoServer]
    ids: list[int]  # endpoint ids
    identities: list[int]
    spare_octet: int  # 10.250.<spare>.0/24 is free for extra host addresses

    def reset(self) -> None:
        """Every endpoint unenforced and empty, conntrack and counters untouched."""
        for ep_id in self.ids:
            self.dp.sync_endpoint(ep_id, {}, ingress_enforced=False, egress_enforced=False)
        self.dp.maps["conntrack"].clear()


@contextlib.contextmanager
def topology():
    from redirect_bpf.datapath import Datapath
    from redirect_bpf.structs import IDENTITY_HOST

    octets = free_octets(4)
    with pod(octets[0]) as a, pod(octets[1]) as b, pod(octets[2]) as c:
        pods = [a, b, c]
        dp = Datapath(f"/sys/fs/bpf/l7proxy/test-{uuid.uuid4().hex[:8]}", node="test")
        servers = []
        try:
            ids, identities = [101, 102, 103], [1001, 1002, 1003]
            for p, ep_id, ident in zip(pods, ids, identities, strict=True):
                dp.attach_endpoint(p.host_if, ep_id, ident, p.pod_ip)
                dp.ipcache_upsert(f"{p.host_ip}/32", IDENTITY_HOST)
                servers.append(EchoServer(p.netns, p.pod_ip))
            yield Topology(dp, pods, servers, ids, identities, octets[3])
        finally:
            for s in servers:
                s.close()
            dp.destroy()


TEST_PIN_PREFIXES = ("test-", "layout-", "prec-", "restart-", "sync-", "gc-", "bench-")


@pytest.fixture(scope="session", autouse=True)
def _stale_test_pins():
    """Pins of test runs killed before their cleanup (pytest-timeout) keep their maps alive:
    remove those older than an hour (never a parallel run's fresh ones)."""
    from redirect_bpf import loader

    with contextlib.suppress(OSError):  # not root, or no bpffs: nothing of ours can be there
        for d in loader.PIN_ROOT.iterdir():
            if d.name.startswith(TEST_PIN_PREFIXES) and time.time() - d.stat().st_mtime > 3600:
                loader.unpin(d)
    yield


@pytest.fixture(scope="session")
def topo():
    """One topology for the whole run (each test starts from `clean`)."""
    with topology() as t:
        yield t


@pytest.fixture
def clean(topo):
    topo.reset()
    yield topo
    topo.reset()


@contextlib.contextmanager
def host_addresses(*cidrs: str):
    """Extra local addresses on lo (targets for CIDR/world/host egress tests)."""
    for c in cidrs:
        sh("ip", "addr", "add", c, "dev", "lo")
    try:
        yield
    finally:
        for c in cidrs:
            sh("ip", "addr", "del", c, "dev", "lo", check=False)


def fresh_reader(dp):
    """An event reader past the backlog earlier tests left in the ring buffer."""
    reader = dp.events()
    drain(reader, 0.1)
    return reader


def drain(reader, wait=0.3):
    time.sleep(wait)
    out = []
    while (f := reader.get(0.05)) is not None:
        out.append(f)
    return out
