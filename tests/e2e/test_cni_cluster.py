"""A podman container adopted by an agent in cluster mode (issue 18): its address comes from the
node's pod CIDR (host-scope IPAM, l7proxy/cluster/ipam.py) and its identity from the cluster's
allocator, both in a real etcd; `podman rm -f` takes its ipcache entry out of etcd again. One
agent, no BPF (the cluster bookkeeping is what is checked here; test_cni_podman.py covers the
datapath)."""

from __future__ import annotations

import asyncio
import ipaddress
import json

import pytest

from l7proxy.cluster import keys
from l7proxy.cluster.kvstore import EtcdKV
from tests.agent_runner import AgentProcess, free_pool
from tests.cluster.etcd_process import EtcdProcess
from tests.conftest import need_binary
from tests.e2e.podman_lab import PodmanLab, build_rootfs
from tests.e2e.test_cni_podman import endpoints, ok

pytestmark = [pytest.mark.root, pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def etcd():
    server = EtcdProcess(need_binary("etcd")).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def cidr():
    return free_pool()  # a /24 no route uses yet; the node leases a /26 of it


@pytest.fixture(scope="module")
def agent(etcd, cidr):
    a = AgentProcess(
        pool="10.200.0.0/16",  # the node pool in node mode; ignored in cluster mode
        admin=False,
        extra_args=(
            "--kvstore", etcd.url, "--node-name", "cni-node", "--cluster-cidr", cidr,
            "--node-cidr-mask-size", "26", "--underlay-ip", "127.0.0.1",
            "--identity-gc-interval", "3600",
        ),
    )  # fmt: skip
    with a:
        yield a


@pytest.fixture(scope="module")
def lab(agent, tmp_path_factory):
    rootfs = build_rootfs(tmp_path_factory.mktemp("cni-rootfs") / "busybox")
    with PodmanLab(tmp_path_factory.mktemp("podman"), rootfs, agent.socket) as lab:
        yield lab


def etcd_get(etcd: EtcdProcess, key: str) -> str | None:
    async def get():
        kv = EtcdKV(etcd.url)
        try:
            item = await kv.get(key)
            return None if item is None else item.value
        finally:
            await kv.close()

    return asyncio.run(get())


def test_container_gets_pod_cidr_address_and_cluster_identity(agent, lab, etcd, cidr):
    status = json.loads(ok(agent, "status", "-o", "json"))
    pod_cidr = ipaddress.ip_network(status["pool"])
    assert pod_cidr.subnet_of(ipaddress.ip_network(cidr)) and pod_cidr.prefixlen == 26
    assert etcd_get(etcd, keys.podcidr(str(pod_cidr))) == "cni-node"

    cid = lab.run("web", {"app": "cluster-web"}, "/bin/sleep", "600")
    try:
        ep = endpoints(agent)["web"]
        assert ep["container_id"] == cid
        assert ipaddress.ip_address(ep["ip"]) in pod_cidr
        labels = keys.labels_key(ep["labels"])
        assert "container:app=cluster-web;" in labels
        assert etcd_get(etcd, keys.identity_labels(labels)) == str(ep["identity"])
        assert etcd_get(etcd, keys.identity_id(ep["identity"])) == labels
        entry = json.loads(etcd_get(etcd, keys.ipcache(ep["ip"])) or "{}")
        assert entry.get("ID") == ep["identity"] and entry.get("Node") == "cni-node", entry
    finally:
        lab.rm("web")
    assert "web" not in endpoints(agent)
    assert etcd_get(etcd, keys.ipcache(ep["ip"])) is None  # DEL took it out of the cluster
