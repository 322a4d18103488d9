"""Cluster mode without etcd: the kvstore URL, pod CIDR splitting, the stored records, the key
layout and the agent's argument checks for the cluster flags."""

from __future__ import annotations

import argparse
import json

import pytest

from l7proxy.agent.store import PolicyDoc
from l7proxy.cluster import ipam, keys
from l7proxy.cluster.kvstore import parse_url
from l7proxy.cluster.records import IPEntry, NodeRecord, PolicySet
from l7proxy.cluster.sink import RecordingSink
from l7proxy.commands.agent import cluster_problem


def test_parse_url():
    assert parse_url("etcd://127.0.0.1:2379") == [("127.0.0.1", 2379)]
    assert parse_url("etcd://10.0.0.1:2379,10.0.0.2:2380") == [
        ("10.0.0.1", 2379),
        ("10.0.0.2", 2380),
    ]
    assert parse_url("etcd://etcd.local:2379") == [("etcd.local", 2379)]
    for bad in ("http://x:1", "etcd://", "etcd://host", "etcd://h:0", "etcd://a:1,b:2"):
        with pytest.raises(ValueError, match="etcd://|HOST:PORT|IPv4"):
            parse_url(bad)


def test_subnets():
    got = ipam.subnets("10.252.0.0/16", 24)
    assert len(got) == 256 and got[0] == "10.252.0.0/24" and got[-1] == "10.252.255.0/24"
    with pytest.raises(ValueError, match="mask size"):
        ipam.subnets("10.252.0.0/16", 8)
    with pytest.raises(ValueError):
        ipam.subnets("10.252.0.1/16", 24)  # host bits set


def test_records_round_trip_with_cilium_field_names():
    node = NodeRecord("node1", "192.0.2.1", "10.252.1.0/24", "tunnel", 7, 3)
    assert '"IPv4AllocCIDR": "10.252.1.0/24"' in node.dumps()
    assert NodeRecord.loads(node.dumps()) == node
    entry = IPEntry("10.252.1.5", 300, "192.0.2.1", "node1")
    assert '"HostIP": "192.0.2.1"' in entry.dumps()
    assert IPEntry.loads(entry.dumps()) == entry
    doc = PolicyDoc("cnp/default/x", "x", "default", "a.yaml", "kind: X\n", 2)
    assert PolicySet.loads(PolicySet(2, (doc,)).dumps()) == PolicySet(2, (doc,))


def test_label_keys_are_sorted_and_exact():
    key = keys.labels_key(["k8s:b=2", "k8s:a=1"])
    assert key == "k8s:a=1;k8s:b=2;"
    assert keys.labels_from_key(key) == ["k8s:a=1", "k8s:b=2"]
    # a label set that is a prefix of another never shares its reference prefix
    assert not keys.identity_value("k8s:a=1;k8s:b=2;", "n").startswith(
        keys.identity_value("k8s:a=1;", "")
    )


def _args(**kw):
    base = dict(
        kvstore="etcd://127.0.0.1:2379", node_name="node1", cluster_cidr="10.252.0.0/16",
        node_cidr_mask_size=24, underlay_ip="", node_lease_ttl=15, identity_gc_interval=60.0,
        pool6="", cluster_cidr6="", node_cidr_mask_size6=64, underlay_ip6="",
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_cluster_flag_checks_say_what_to_give():
    assert cluster_problem(_args()) is None
    assert cluster_problem(_args(kvstore=None, node_name="")) is None  # single node: no checks
    assert "--node-name" in cluster_problem(_args(node_name=""))
    assert "--cluster-cidr" in cluster_problem(_args(cluster_cidr=""))
    assert "--kvstore" in cluster_problem(_args(kvstore="localhost:2379"))
    assert "--underlay-ip" in cluster_problem(_args(underlay_ip="nope"))
    assert "--node-lease-ttl" in cluster_problem(_args(node_lease_ttl=0))
    assert "mask size" in cluster_problem(_args(node_cidr_mask_size=31))
    # dual stack
    assert cluster_problem(_args(cluster_cidr6="fd00:10:252::/56")) is None
    assert "--cluster-cidr6" in cluster_problem(_args(cluster_cidr6="10.9.0.0/16"))
    assert "--node-cidr-mask-size6" in cluster_problem(_args(cluster_cidr6="fd00::/40"))
    assert "--cluster-cidr6" in cluster_problem(_args(pool6="fd00:1::/64"))
    assert "--underlay-ip6" in cluster_problem(
        _args(cluster_cidr6="fd00:10:252::/56", underlay_ip6="10.0.0.1")
    )


def test_a_dual_stack_node_record_reads_like_cilium_s():
    rec = NodeRecord(
        "n2", "192.0.2.2", "10.252.2.0/24", "native", 3,
        pod_cidr6="fd00:10:252:2::/64", underlay_ip6="2001:db8::2",
    )  # fmt: skip
    d = json.loads(rec.dumps())
    assert d["IPv6AllocCIDR"] == "fd00:10:252:2::/64"
    assert {a["IP"] for a in d["IPAddresses"]} == {"192.0.2.2", "2001:db8::2"}
    assert NodeRecord.loads(rec.dumps()) == rec
    single = NodeRecord("n1", "192.0.2.1", "10.252.1.0/24", "tunnel", 0)
    assert "IPv6AllocCIDR" not in json.loads(single.dumps())
    assert NodeRecord.loads(single.dumps()) == single


def test_recording_sink_keeps_the_remote_state():
    sink = RecordingSink()
    sink.node_up("node2", "192.0.2.2", "10.252.2.0/24")
    sink.ipcache_set("10.252.2.5/32", 300, "192.0.2.2")
    sink.ipcache_delete("10.252.2.5/32")
    sink.node_down("node2")
    assert sink.snapshot() == {"nodes": {}, "ipcache": {}}
    assert [c[0] for c in sink.calls] == ["node_up", "ipcache_set", "ipcache_delete", "node_down"]
