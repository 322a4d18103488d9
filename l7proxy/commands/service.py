"""`l7proxy service create|list|get|delete`: a VIP:port that load-balances to backends."""

from __future__ import annotations

import json
import sys

from l7proxy.agent.client import Client, agent_action
from l7proxy.commands.endpoint import _table  # the same columns as `endpoint list`
from l7proxy.services.model import ServiceError, build


def register(sub) -> None:
    p = sub.add_parser("service", help="create, list, show and delete services (VIP -> backends)")
    ssub = p.add_subparsers(dest="service_command", metavar="ACTION", required=True)

    c = ssub.add_parser(
        "create",
        help="a VIP:PORT/PROTO balanced over the endpoints a selector picks, or fixed backends",
    )
    c.add_argument("name")
    c.add_argument("--vip", required=True, metavar="IP:PORT[/TCP|UDP]", help="the frontend")
    c.add_argument("--selector", default="", metavar="k=v[,k=v...]", help="endpoints by label")
    c.add_argument("--target-port", type=int, metavar="PORT", help="the backends' port (selector)")
    c.add_argument(
        "--backend",
        dest="backends",
        action="append",
        default=[],
        metavar="IP:PORT",
        help="a fixed backend (repeatable) instead of --selector",
    )
    c.add_argument("--node-port", type=int, metavar="N", help="also on every node's port N")
    c.add_argument("--affinity", default="none", choices=("none", "client-ip"))
    c.add_argument("--affinity-timeout", type=int, metavar="SECONDS", help="default 10800")
    c.add_argument("--dsr", action="store_true", help="NodePort: the backend answers directly")
    c.add_argument("--lb", dest="algorithm", default="random", choices=("random", "maglev"))
    c.add_argument("--namespace", default="default")
    agent_action(c, _create)

    ls = ssub.add_parser("list", help="list services and their current backends")
    agent_action(ls, _list, outputs=("table", "json"))

    g = ssub.add_parser("get", help="one service as JSON")
    g.add_argument("name")
    g.add_argument("--namespace", default="default")
    agent_action(g, _get)

    d = ssub.add_parser("delete", help="delete a service")
    d.add_argument("name")
    d.add_argument("--namespace", default="default")
    agent_action(d, _delete)


def _create(args) -> int:
    fields = {
        "name": args.name,
        "vip": args.vip,
        "selector": args.selector,
        "target_port": args.target_port,
        "backends": args.backends,
        "node_port": args.node_port,
        "affinity": args.affinity,
        "affinity_timeout": args.affinity_timeout,
        "dsr": args.dsr,
        "algorithm": args.algorithm,
        "namespace": args.namespace,
    }
    try:
        build(**fields)  # the same checks the agent makes, without a round trip
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    svc = Client(args.socket).call("service.create", **fields)
    print(f"service {svc['name']} created: {_frontend(svc)} -> {_backends_text(svc)}")
    for warning in svc.get("warnings", ()):
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _frontend(svc: dict) -> str:
    return f"{svc['vip']}:{svc['port']}/{svc['protocol']}"


def _backends_text(svc: dict) -> str:
    eps = svc.get("endpoints") or []
    if not eps:
        return "no backends yet"
    return ",".join(f"{e['ip']}:{e['port']}" for e in eps)


def _list(args) -> int:
    items = Client(args.socket).call("service.list")
    if args.output == "json":
        print(json.dumps(items, indent=2))
        return 0
    rows = [("NAME", "FRONTEND", "LB", "AFFINITY", "NODEPORT", "SELECTOR", "BACKENDS")]
    for s in items:
        rows.append(
            (
                s["name"],
                _frontend(s),
                s["algorithm"],
                f"client-ip {s['affinityTimeoutSeconds']}s" if s["affinityTimeoutSeconds"] else "-",
                str(s["nodePort"] or "-") + (" dsr" if s.get("dsr") else ""),
                ",".join(f"{k}={v}" for k, v in s["selector"].items()) or "-",
                _backends_text(s),
            )
        )
    print(_table(rows))
    return 0


def _get(args) -> int:
    svc = Client(args.socket).call("service.get", name=args.name, namespace=args.namespace)
    print(json.dumps(svc, indent=2))
    return 0


def _delete(args) -> int:
    Client(args.socket).call("service.delete", name=args.name, namespace=args.namespace)
    print(f"service {args.name} deleted")
    return 0
