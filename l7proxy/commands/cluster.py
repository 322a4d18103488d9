"""`l7proxy cluster status`: the nodes of a cluster as etcd has them.

Reads etcd directly (any node's agent may be down). The etcd address comes from --kvstore, else
$L7PROXY_KVSTORE, else the agent at the selected socket (its `cluster.info`).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from l7proxy.agent.client import Client, add_socket_arg, run

KVSTORE_ENV = "L7PROXY_KVSTORE"


def register(sub) -> None:
    p = sub.add_parser("cluster", help="cluster mode: nodes, pod CIDRs, health, policy revisions")
    csub = p.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    st = csub.add_parser(
        "status", help="every node: underlay IP, pod CIDR, health, policy revision"
    )
    st.add_argument("-o", "--output", choices=("text", "json"), default="text")
    st.add_argument("--kvstore", default=None, metavar="etcd://HOST:PORT[,...]")
    add_socket_arg(st)
    st.set_defaults(func=lambda a: run(lambda: _status(a)))


def _kvstore_url(args) -> str:
    if args.kvstore:
        return args.kvstore
    if os.environ.get(KVSTORE_ENV):
        return os.environ[KVSTORE_ENV]
    return Client(args.socket, timeout=5.0).call("cluster.info")["kvstore"]


def _status(args) -> int:
    from l7proxy.cluster.kvstore import KVStoreDown
    from l7proxy.cluster.status import cluster_status

    url = _kvstore_url(args)
    try:
        st = asyncio.run(cluster_status(url))
    except (KVStoreDown, ValueError) as exc:
        print(f"l7proxy cluster status: error: {exc}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(st, indent=2))
        return 0
    print(f"kvstore {st['kvstore']}, cluster policy revision {st['revision']}")
    six = any(n.get("pod_cidr6") for n in st["nodes"])  # a dual-stack cluster: one more column
    head = f"{'NODE':<16}{'UNDERLAY IP':<17}{'POD CIDR':<20}{'ROUTING':<9}{'HEALTH':<8}"
    print(head + (f"{'POLICY REV':<12}POD CIDR6" if six else "POLICY REV"))
    for n in st["nodes"]:
        line = (
            f"{n['name']:<16}{n['underlay_ip']:<17}{n['pod_cidr']:<20}{n['routing']:<9}"
            f"{n['health']:<8}"
        )
        rev = str(n["policy_revision"])
        print(line + (f"{rev:<12}{n.get('pod_cidr6', '')}" if six else rev))
    return 0
