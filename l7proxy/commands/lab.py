"""`l7proxy lab`: a local cluster of N nodes on this machine (docs/lab.md).

l7proxy lab up --nodes 3 [--routing tunnel|native]     etcd + 3 host namespaces + 3 agents
l7proxy --node node2 endpoint create web --labels app=web
l7proxy lab node stop node2 / start node2               SIGKILL the agent / start it again
l7proxy lab etcd stop / start                           an etcd outage and its end
l7proxy lab down                                        everything goes, also after a crash
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def register(sub) -> None:
    p = sub.add_parser("lab", help="a local multi-node cluster (etcd + node namespaces + agents)")
    lab = p.add_subparsers(dest="lab_command", metavar="ACTION", required=True)
    up = lab.add_parser("up", help="start etcd and N nodes, each with its own agent")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument(
        "--routing", default="tunnel", help="tunnel (VXLAN, identity in the VNI) or native"
    )
    up.add_argument("--lease-ttl", type=int, default=10, help="node lease TTL in seconds")
    up.set_defaults(func=_up)
    down = lab.add_parser("down", help="remove everything a lab made (also after a crash)")
    down.set_defaults(func=_down)
    show = lab.add_parser("status", help="the lab's nodes, their sockets and processes")
    show.add_argument("-o", "--output", choices=("text", "json"), default="text")
    show.set_defaults(func=_status)
    etcd = lab.add_parser("etcd", help="stop or start the lab's etcd (data kept)")
    etcd.add_argument("action", choices=("stop", "start"))
    etcd.set_defaults(func=_etcd)
    node = lab.add_parser("node", help="stop (SIGKILL) or start one node's agent")
    node.add_argument("action", choices=("stop", "start"))
    node.add_argument("name")
    node.add_argument("--graceful", action="store_true", help="stop with SIGTERM instead")
    node.add_argument(
        "--proxy-worker",
        choices=("inline", "process"),
        help="start: run the node's proxy in the agent or in a worker process (kept for later "
        "starts; default: as before)",
    )
    node.set_defaults(func=_node)


def _fail(message: str) -> int:
    print(f"l7proxy lab: error: {message}", file=sys.stderr)
    return 1


def _need_root() -> str | None:
    return None if os.geteuid() == 0 else "the lab needs root (namespaces, links, BPF)"


def _up(args) -> int:
    from l7proxy.lab import lifecycle

    if problem := _need_root():
        return _fail(problem)
    started = time.monotonic()
    try:
        lab = lifecycle.up(args.nodes, args.routing, lease_ttl=args.lease_ttl)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        return _fail(str(exc))
    except RuntimeError as exc:
        return _fail(f"{exc}\n(the lab stays as it is for a look; `l7proxy lab down` removes it)")
    took = time.monotonic() - started
    print(
        f"lab up: {len(lab.nodes)} nodes, routing {lab.routing}, etcd {lab.etcd_url} ({took:.1f}s)"
    )
    for node in lab.nodes.values():
        print(f"  {node.name}: underlay {node.underlay_ip}, agent socket {node.socket}")
    print("use: l7proxy --node NAME <command>, l7proxy cluster status, l7proxy lab down")
    return 0


def _down(args) -> int:
    from l7proxy.lab import lifecycle

    if problem := _need_root():
        return _fail(problem)
    found = lifecycle.down()
    print("lab down: " + ("; ".join(found) if found else "nothing to remove"))
    return 0


def _loaded():
    from l7proxy.lab import state

    lab = state.LabState.load()
    if lab is None:
        raise LookupError(f"no lab in {state.lab_dir()}: run `l7proxy lab up --nodes N` first")
    return lab


def _status(args) -> int:
    from l7proxy.lab import pidfile, processes, state

    try:
        lab = _loaded()
    except LookupError as exc:
        return _fail(str(exc))
    out = {
        "routing": lab.routing,
        "etcd": {"url": lab.etcd_url, "running": bool(pidfile.alive(state.lab_dir() / "etcd.pid"))},
        "nodes": [
            {
                "name": n.name,
                "underlay_ip": n.underlay_ip,
                "socket": n.socket,
                "agent_running": bool(pidfile.alive(processes.agent_pidfile(n))),
            }
            for n in lab.nodes.values()
        ],
    }
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print(f"routing {out['routing']}, etcd {lab.etcd_url} running={out['etcd']['running']}")
        for n in out["nodes"]:
            print(f"  {n['name']}: {n['underlay_ip']} agent running={n['agent_running']}")
    return 0


def _etcd(args) -> int:
    from l7proxy.lab import processes

    try:
        lab = _loaded()
        if args.action == "stop":
            print("etcd stopped" if processes.stop_etcd() else "etcd was not running")
        else:
            processes.start_etcd(lab)
            print(f"etcd running at {lab.etcd_url}")
    except (LookupError, RuntimeError) as exc:
        return _fail(str(exc))
    return 0


def _node(args) -> int:
    from l7proxy.lab import processes

    try:
        lab = _loaded()
        node = lab.node(args.name)
        if args.action == "stop":
            sig = signal.SIGTERM if args.graceful else signal.SIGKILL
            ran = processes.stop_agent(node, sig=sig)
            print(f"{node.name}: agent {'stopped' if ran else 'was not running'}")
        else:
            if args.proxy_worker:
                node.args = processes.agent_args(node, lab, proxy_worker=args.proxy_worker)
                lab.save()
            processes.start_agent(node)
            processes.wait_agent(node, time.monotonic() + processes.AGENT_READY_S)
            print(f"{node.name}: agent running, socket {node.socket}")
    except (LookupError, RuntimeError) as exc:
        return _fail(str(exc))
    return 0
