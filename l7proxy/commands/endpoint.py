"""`l7proxy endpoint create|list|delete`: endpoints are namespaces with a veth, an IP and labels."""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from pathlib import Path

from l7proxy.agent import ports
from l7proxy.agent.client import Client, agent_action


def register(sub) -> None:
    p = sub.add_parser("endpoint", help="create, list and delete endpoints (via the agent)")
    esub = p.add_subparsers(dest="endpoint_command", metavar="ACTION", required=True)

    c = esub.add_parser("create", help="create a namespace NAME with a veth, an IP and labels")
    c.add_argument("name")
    c.add_argument("--labels", required=True, help="k=v[,k=v...] (source k8s: unless given)")
    c.add_argument("--ip", help="A.B.C.D[/NN] instead of the next free address of the pool")
    c.add_argument(
        "--ip6", help="an IPv6 address instead of the next free one of the agent's --pool6"
    )
    c.add_argument(
        "--ipv6-only",
        action="store_true",
        help="no IPv4 address, only one from the agent's --pool6 (node mode on one node)",
    )
    c.add_argument(
        "--port",
        dest="ports",
        action="append",
        type=_named_port,
        default=[],
        metavar="NAME=NUMBER[/PROTO]",
        help="a named port, as a container port's name (repeatable); policies' "
        "toPorts port: NAME resolve to NUMBER. PROTO (TCP, UDP, SCTP; default TCP) is shown "
        "only: the rule's protocol decides",
    )
    agent_action(c, _create)

    ls = esub.add_parser("list", help="list endpoints")
    agent_action(ls, _list, outputs=("table", "json"))

    x = esub.add_parser(
        "exec",
        help="run a command in the endpoint (its namespace, and its cgroup in sidecar mode)",
    )
    x.add_argument("name")
    x.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...")
    agent_action(x, _exec)

    d = esub.add_parser("delete", help="delete an endpoint and its namespace")
    d.add_argument("name")
    d.add_argument(
        "--grace-period",
        type=float,
        default=0,
        metavar="SECONDS",
        help="first let it finish its service connections: no new ones for SECONDS, then delete",
    )
    agent_action(d, _delete)


def _named_port(text: str) -> ports.NamedPort:
    try:
        return ports.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _create(args) -> int:
    try:
        named = ports.from_json([str(p) for p in args.ports])  # a name given twice
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # In cluster mode a label set no node has used yet needs etcd for its identity: while etcd
    # is down the create waits for it (no client timeout) and says so once.
    note = threading.Timer(WAIT_NOTE_S, _waiting_note)
    note.daemon = True
    note.start()
    try:
        ep = Client(args.socket, timeout=None).call(
            "endpoint.create",
            name=args.name,
            labels=args.labels,
            ip=args.ip,
            ip6=args.ip6,
            ipv6_only=args.ipv6_only,
            ports=[p.to_json() for p in named],
        )
    finally:
        note.cancel()
    shown = _ports_text(ep.get("ports"))
    print(
        f"endpoint {ep['name']} created: netns {ep['netns']}, "
        + (f"ip {ep['ip']}/{ep['prefixlen']}, " if ep["ip"] else "")
        + (f"ip6 {ep['ip6']}/128, " if ep.get("ip6") else "")
        + f"identity {ep['identity']}, host veth {ep['host_if']}"
        + (f", ports {shown}" if shown else "")
    )
    return 0


def _ports_text(items) -> str:
    return ",".join(f"{p['name']}={p['port']}/{p['protocol']}" for p in items or ())


WAIT_NOTE_S = 3.0


def _waiting_note() -> None:
    print(
        "waiting for the agent: in cluster mode new labels need etcd for their identity "
        "(`l7proxy status` shows cluster.waiting_for_identity); Ctrl-C stops waiting here only",
        file=sys.stderr,
        flush=True,
    )


def _list(args) -> int:
    eps = Client(args.socket).call("endpoint.list")
    if args.output == "json":
        print(json.dumps(eps, indent=2))
        return 0
    rows = [
        ("NAME", "IP", "IDENTITY", "INGRESS", "EGRESS", "HOST-IF", "PORTS", "CONTAINER", "LABELS")
    ]
    for ep in eps:
        pol = ep.get("policy") or {}
        rows.append(
            (
                ep["name"],
                ",".join(ip for ip in (ep["ip"], ep.get("ip6")) if ip),
                str(ep["identity"]),
                "Enabled" if pol.get("ingress") else "Disabled",
                "Enabled" if pol.get("egress") else "Disabled",
                ep["host_if"],
                _ports_text(ep.get("ports")) or "-",
                f"{ep['runtime']}:{ep['container_id'][:12]}" if ep.get("container_id") else "-",
                ",".join(lb for lb in ep["labels"] if "io.kubernetes.pod.namespace" not in lb),
            )
        )
    print(_table(rows))
    return 0


def _exec(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("error: no command given (endpoint exec NAME -- CMD...)", file=sys.stderr)
        return 2
    eps = {e["name"]: e for e in Client(args.socket).call("endpoint.list")}
    ep = eps.get(args.name)
    if ep is None:
        print(f"error: no endpoint named {args.name}", file=sys.stderr)
        return 1
    if ep.get("cgroup"):
        # Join the endpoint's cgroup first: the connect() hook of sidecar mode works per cgroup,
        # and children (ip netns exec, then the command) inherit it.
        Path(ep["cgroup"], "cgroup.procs").write_text(str(os.getpid()))
    os.execvp("ip", ["ip", "netns", "exec", ep["netns"], *cmd])
    return 127


def _delete(args) -> int:
    grace = args.grace_period
    if not 0 <= grace <= 3600:
        print(f"error: --grace-period {grace:g}: give 0-3600 seconds", file=sys.stderr)
        return 2
    Client(args.socket, timeout=60 + grace).call(
        "endpoint.delete", name=args.name, grace_period=grace
    )
    print(f"endpoint {args.name} deleted")
    return 0


def _table(rows) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in rows
    )
