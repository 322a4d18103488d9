"""Services in cluster mode (issue 16), real etcd and two real agents (no BPF: this is the
control plane): a service created on one node is stored under Cilium's services prefix and
shown on every node, a selector service picks up the other node's pods through the cluster's
ipcache, delete on any node removes it everywhere, and while etcd is down changes are refused
with the reason while every node keeps its services."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest

from l7proxy.services.cluster_sync import PREFIX
from tests.agent_runner import AgentProcess, free_pool
from tests.cluster.etcd_process import EtcdProcess
from tests.conftest import need_binary

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]


def ok(agent, *args) -> str:
    r = agent.cli(*args)
    assert r.returncode == 0, f"{args}: {r.stderr}\n{agent.log()}"
    return r.stdout


def until(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (got := check()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)
    return got


def endpoints_of(agent, name: str):
    r = agent.cli("service", "get", name)
    if r.returncode != 0:
        return None
    return sorted(e["ip"] for e in json.loads(r.stdout)["endpoints"])


async def etcd_keys(url: str) -> dict[str, str]:
    from l7proxy.cluster.kvstore import EtcdKV

    kv = EtcdKV(url)
    try:
        items, _ = await kv.list(PREFIX)
        return {i.key: i.value for i in items}
    finally:
        await kv.close()


@pytest.fixture
def two_nodes():
    etcd = EtcdProcess(need_binary("etcd")).start()
    cidr = free_pool()
    agents = []
    try:
        for name in ("node1", "node2"):
            agent = AgentProcess(
                pool="10.200.0.0/16",
                admin=False,
                extra_args=(
                    "--kvstore", etcd.url, "--node-name", name, "--cluster-cidr", cidr,
                    "--node-cidr-mask-size", "26", "--underlay-ip", "127.0.0.1",
                    "--node-lease-ttl", "5",
                ),
            )  # fmt: skip
            agents.append(agent)
            agent.start()
        yield etcd, agents[0], agents[1]
    finally:
        for agent in agents:
            with contextlib.suppress(Exception):
                agent.close()
        etcd.close()


def test_services_live_in_etcd_and_follow_pods_on_every_node(two_nodes):
    etcd, a, b = two_nodes
    ok(a, "endpoint", "create", "web-a", "--labels", "app=web")
    ok(b, "endpoint", "create", "web-b", "--labels", "app=web")
    ok(b, "endpoint", "create", "db-b", "--labels", "app=db")
    ip_a = json.loads(ok(a, "endpoint", "list", "-o", "json"))[0]["ip"]
    ip_b = next(
        e["ip"] for e in json.loads(ok(b, "endpoint", "list", "-o", "json")) if e["name"] == "web-b"
    )
    ok(a, "service", "create", "web", "--vip", "10.96.16.20:80/TCP", "--selector", "app=web",
       "--target-port", "8080", "--lb", "maglev")  # fmt: skip
    stored = asyncio.run(etcd_keys(etcd.url))
    assert list(stored) == [f"{PREFIX}default/web"]
    assert json.loads(stored[f"{PREFIX}default/web"])["algorithm"] == "maglev"
    both = sorted([ip_a, ip_b])
    assert until(lambda: endpoints_of(a, "web") == both)  # node2's pod via the cluster ipcache
    assert until(lambda: endpoints_of(b, "web") == both)
    # the name is the cluster's: the other node cannot create it again
    r = b.cli("service", "create", "web", "--vip", "10.96.16.21:80", "--backend", "10.0.0.1:80")
    assert r.returncode == 1 and "already exists" in r.stderr
    # a pod that goes away leaves the service on every node
    ok(b, "endpoint", "delete", "web-b")
    assert until(lambda: endpoints_of(a, "web") == [ip_a])
    assert until(lambda: endpoints_of(b, "web") == [ip_a])
    # delete on the other node removes it everywhere
    ok(b, "service", "delete", "web")
    assert until(lambda: endpoints_of(a, "web") is None)
    assert asyncio.run(etcd_keys(etcd.url)) == {}


def test_while_etcd_is_down_changes_are_refused_and_services_stay(two_nodes):
    etcd, a, b = two_nodes
    ok(a, "service", "create", "ext", "--vip", "10.96.16.22:443/TCP", "--backend", "192.0.2.1:443")
    assert until(lambda: endpoints_of(b, "ext") == ["192.0.2.1"])
    etcd.stop()
    try:
        r = a.cli("service", "create", "x", "--vip", "10.96.16.23:80", "--backend", "192.0.2.2:80")
        assert r.returncode == 1
        assert "service create needs the kvstore" in r.stderr and "nothing changed" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
        r = b.cli("service", "delete", "ext")
        assert r.returncode == 1 and "needs the kvstore" in r.stderr
        for agent in (a, b):  # the cached services are still there (and in the kernel)
            assert endpoints_of(agent, "ext") == ["192.0.2.1"]
    finally:
        etcd.start()
    # etcd is back: the client reconnects within its backoff, then the create goes through and
    # the other node's watch (resumed) brings it
    args = ("service", "create", "x", "--vip", "10.96.16.23:80", "--backend", "192.0.2.2:80")

    def created() -> bool:
        r = a.cli(*args)  # a try whose answer was lost may have written it: "already exists"
        return r.returncode == 0 or "already exists" in r.stderr

    assert until(created, timeout=30)
    assert until(lambda: endpoints_of(b, "x") == ["192.0.2.2"])
