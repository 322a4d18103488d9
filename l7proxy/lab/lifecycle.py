"""`lab up` and `lab down`: build the underlay, start etcd and the agents; and remove all of it,
also what a crashed lab left (found by name prefix and pidfile, never by process name)."""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

from l7proxy.agent.proxy_worker_control import stop_worker
from l7proxy.lab import pidfile, processes, state, underlay

ROUTINGS = ("tunnel", "native")
CGROUP_ROOT = Path("/sys/fs/cgroup/unified/l7proxy")


def up(nodes: int, routing: str, *, lease_ttl: int = 10, cluster_cidr: str = state.CLUSTER_CIDR):
    if not 1 <= nodes <= state.MAX_NODES:
        raise ValueError(f"--nodes {nodes}: give 1 to {state.MAX_NODES}")
    if routing not in ROUTINGS:
        raise ValueError(f"--routing {routing!r}: give tunnel or native")
    existing = state.LabState.load()
    if existing is not None or underlay.leftover_namespaces():
        raise FileExistsError("a lab is already up (or left over): run `l7proxy lab down` first")
    d = state.lab_dir()
    d.mkdir(parents=True, exist_ok=True)
    lab = state.LabState(
        routing=routing,
        cluster_cidr=cluster_cidr,
        etcd_url=f"etcd://{state.BRIDGE_IP}:{state.ETCD_PORT}",
        etcd_args=processes.etcd_args(d / "etcd-data"),
        lease_ttl=lease_ttl,
        nodes={},
    )
    for i in range(1, nodes + 1):
        name = f"node{i}"
        node_dir = d / name
        node = state.NodeState(
            name=name,
            netns=f"{state.NAME_PREFIX}{name}",
            underlay_ip=state.node_ip(i),
            host_link=f"l7lab-h{i}",
            dir=str(node_dir),
            socket=str(node_dir / "agent.sock"),
            bpf_dir=str(state.BPF_PIN_ROOT / f"lab-{name}"),
        )
        node.args = processes.agent_args(node, lab)
        lab.nodes[name] = node
    lab.save()  # first: a crash from here on leaves a state `lab down` can read
    underlay.ensure_bridge()
    for i, node in enumerate(lab.nodes.values(), start=1):
        Path(node.dir).mkdir(parents=True, exist_ok=True)
        underlay.add_host(node.netns, node.host_link, state.node_ip(i), state.node_ip6(i))
    processes.start_etcd(lab)
    for node in lab.nodes.values():
        processes.start_agent(node)
    deadline = time.monotonic() + processes.AGENT_READY_S + 10 * nodes
    for node in lab.nodes.values():
        processes.wait_agent(node, deadline)
    return lab


def down() -> list[str]:
    """Stop the agents and etcd, remove namespaces, links, pins, cgroups and the lab directory.
    Returns what it found, one line each."""
    done = []
    d = state.lab_dir()
    lab = state.LabState.load()
    pidfiles = sorted(d.glob("*/agent.pid")) if d.is_dir() else []
    for path in pidfiles:
        if pidfile.stop(path):
            done.append(f"stopped agent {path.parent.name}")
    for state_dir in sorted(d.glob("*/state")) if d.is_dir() else []:
        # a node started with --proxy-worker process: its worker outlives the agent on purpose
        stop_worker(state_dir)
    if processes.stop_etcd():
        done.append("stopped etcd")
    done += underlay.remove_all()
    pins = [Path(n.bpf_dir) for n in lab.nodes.values()] if lab else []
    if state.BPF_PIN_ROOT.is_dir():
        pins += [p for p in state.BPF_PIN_ROOT.iterdir() if p.name.startswith("lab-")]
    for pin_dir in dict.fromkeys(pins):
        if pin_dir.is_dir():
            for entry in pin_dir.iterdir():
                with contextlib.suppress(OSError):
                    entry.unlink()
            with contextlib.suppress(OSError):
                pin_dir.rmdir()
                done.append(f"pins {pin_dir}")
    if CGROUP_ROOT.is_dir():
        for cg in CGROUP_ROOT.iterdir():
            if cg.name.startswith(state.NAME_PREFIX):
                with contextlib.suppress(OSError):
                    cg.rmdir()
                    done.append(f"cgroup {cg}")
    if d.is_dir():
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"state {d}")
    return done
