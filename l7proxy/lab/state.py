"""Where a lab lives and what it recorded: one JSON file in the lab directory, written by `lab up`
and read by `lab down`, `lab etcd|node ...` and `l7proxy --node NAME ...`.

Every name the lab makes starts with NAME_PREFIX (namespaces, links, pins, the agents' endpoint
namespaces), so `lab down` also finds what a crashed `lab up` left without its state file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

LAB_DIR_ENV = "L7PROXY_LAB_DIR"
DEFAULT_LAB_DIR = Path("/var/run/l7proxy-lab")
NAME_PREFIX = "l7lab-"
BRIDGE = "l7lab0"
UNDERLAY = "10.251.0.0/24"
BRIDGE_IP = "10.251.0.1"
ETCD_PORT, ETCD_PEER_PORT = 2379, 2380
CLUSTER_CIDR = "10.252.0.0/16"
# Dual stack (issue 17): pods get an IPv6 address from a /64 per node of this, and each host an
# IPv6 underlay address next to its IPv4 one (native routing's IPv6 next hop; VXLAN stays IPv4).
CLUSTER_CIDR6 = "fd00:10:252::/56"
UNDERLAY6 = "fd00:10:251::/64"
BRIDGE_IP6 = "fd00:10:251::1"
BPF_PIN_ROOT = Path("/sys/fs/bpf/l7proxy")
MAX_NODES = 200


def lab_dir() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or DEFAULT_LAB_DIR)


def node_ip(index: int) -> str:
    """node1 -> 10.251.0.11, ..."""
    return f"10.251.0.{10 + index}"


def node_ip6(index: int) -> str:
    """node1 -> fd00:10:251::11, ... (the same digits as its IPv4 host part)"""
    return f"fd00:10:251::{10 + index}"


@dataclass
class NodeState:
    name: str
    netns: str
    underlay_ip: str
    host_link: str  # the veth end on the bridge
    dir: str
    socket: str
    bpf_dir: str
    args: list[str] = field(default_factory=list)  # the agent's command line


@dataclass
class LabState:
    routing: str
    cluster_cidr: str
    etcd_url: str
    etcd_args: list[str]
    lease_ttl: int
    nodes: dict[str, NodeState]
    cluster_cidr6: str = CLUSTER_CIDR6

    @property
    def path(self) -> Path:
        return lab_dir() / "lab.json"

    def save(self) -> None:
        lab_dir().mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(self.path)

    @classmethod
    def load(cls) -> LabState | None:
        path = lab_dir() / "lab.json"
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        raw["nodes"] = {n: NodeState(**v) for n, v in raw["nodes"].items()}
        return cls(**raw)

    def node(self, name: str) -> NodeState:
        if name not in self.nodes:
            known = ", ".join(sorted(self.nodes, key=lambda n: (len(n), n)))
            raise LookupError(f"no node {name!r} in the lab (nodes: {known})")
        return self.nodes[name]


def select_node(name: str | None) -> None:
    """`l7proxy --node NAME ...`: point the CLI at that lab node's agent socket. Without a name
    (for `cluster status`) only the lab's etcd becomes the default kvstore, if a lab is up."""
    lab = LabState.load()
    if name is None:
        if lab is not None:
            os.environ.setdefault("L7PROXY_KVSTORE", lab.etcd_url)
        return
    if lab is None:
        raise LookupError(f"no lab in {lab_dir()}: run `l7proxy lab up --nodes N` first")
    node = lab.node(name)
    os.environ["L7PROXY_SOCKET"] = node.socket
    os.environ.setdefault("L7PROXY_KVSTORE", lab.etcd_url)
