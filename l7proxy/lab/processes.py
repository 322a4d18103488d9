"""The lab's processes: one etcd on the bridge address (root namespace) and one agent per node,
run inside the node's host namespace with `nsenter --net` (only the network namespace changes:
the BPF filesystem and cgroups stay the host's, so each agent pins under its own directory)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from l7proxy.lab import pidfile, state

ETCD_READY_S = 20.0
AGENT_READY_S = 90.0  # each agent compiles the datapath with bcc: seconds on a busy machine


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if not found:
        raise FileNotFoundError("etcd is not installed: run make setup (Debian etcd-server)")
    return found


def etcd_args(data_dir: Path) -> list[str]:
    client = f"http://{state.BRIDGE_IP}:{state.ETCD_PORT}"
    peer = f"http://{state.BRIDGE_IP}:{state.ETCD_PEER_PORT}"
    return [
        etcd_binary(),
        "--name", "lab",
        "--data-dir", str(data_dir),
        "--listen-client-urls", client,
        "--advertise-client-urls", client,
        "--listen-peer-urls", peer,
        "--initial-advertise-peer-urls", peer,
        "--initial-cluster", f"lab={peer}",
    ]  # fmt: skip


def agent_args(
    node: state.NodeState, lab: state.LabState, *, proxy_worker: str = "inline"
) -> list[str]:
    return [
        sys.executable, "-m", "l7proxy", "agent",
        "--state-dir", str(Path(node.dir) / "state"),
        "--socket", node.socket,
        "--bpf-dir", node.bpf_dir,
        "--netns-prefix", f"{node.netns}-",
        "--kvstore", lab.etcd_url,
        "--node-name", node.name,
        "--cluster-cidr", lab.cluster_cidr,
        *(("--cluster-cidr6", lab.cluster_cidr6) if lab.cluster_cidr6 else ()),
        "--routing", lab.routing,
        "--underlay-ip", node.underlay_ip,
        "--node-lease-ttl", str(lab.lease_ttl),
        "--proxy-worker", proxy_worker,
    ]  # fmt: skip


def _spawn(args: list[str], log: Path, pid_path: Path, netns_name: str | None = None) -> int:
    if netns_name is not None:
        args = ["nsenter", f"--net=/var/run/netns/{netns_name}", "--", *args]
    env = dict(os.environ)
    # The agent imports this very checkout (a worktree or an installed copy alike).
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    # The agent forks (pyroute2's netns helpers) while gRPC (the etcd client) has threads: with
    # grpcio's fork handlers on, the forked child aborts in gRPC's poller.
    env.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # a Ctrl-C on `lab up` does not take the cluster down
        )  # fmt: skip
    pidfile.write(pid_path, proc.pid)
    return proc.pid


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def start_etcd(lab: state.LabState) -> None:
    d = state.lab_dir()
    pid_path = d / "etcd.pid"
    if pidfile.alive(pid_path):
        return
    _spawn(lab.etcd_args, d / "etcd.log", pid_path)
    deadline = time.monotonic() + ETCD_READY_S
    while time.monotonic() < deadline:
        if not pidfile.alive(pid_path):
            raise RuntimeError(f"etcd exited:\n{tail(d / 'etcd.log')}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection((state.BRIDGE_IP, state.ETCD_PORT), 0.2),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"etcd did not listen within {ETCD_READY_S:.0f}s:\n{tail(d / 'etcd.log')}")


def stop_etcd(*, sig: int = 15) -> bool:
    return pidfile.stop(state.lab_dir() / "etcd.pid", sig=sig)


def agent_pidfile(node: state.NodeState) -> Path:
    return Path(node.dir) / "agent.pid"


def start_agent(node: state.NodeState) -> None:
    if pidfile.alive(agent_pidfile(node)):
        return
    Path(node.dir).mkdir(parents=True, exist_ok=True)
    _spawn(node.args, Path(node.dir) / "agent.log", agent_pidfile(node), node.netns)


def wait_agent(node: state.NodeState, deadline: float) -> None:
    """Until the agent answers on its socket (it listens once it joined the cluster)."""
    from l7proxy.agent.client import Client

    log = Path(node.dir) / "agent.log"
    while time.monotonic() < deadline:
        if not pidfile.alive(agent_pidfile(node)):
            raise RuntimeError(f"the agent of {node.name} exited:\n{tail(log)}")
        if Path(node.socket).exists():
            with contextlib.suppress(Exception):
                Client(node.socket, timeout=2.0).call("status")
                return
        time.sleep(0.1)
    raise RuntimeError(f"the agent of {node.name} did not answer in time:\n{tail(log)}")


def stop_agent(node: state.NodeState, *, sig: int = 15) -> bool:
    return pidfile.stop(agent_pidfile(node), sig=sig)
