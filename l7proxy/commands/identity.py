"""`l7proxy identity list`: the reserved identities and the ones allocated for endpoint labels."""

from __future__ import annotations

import json

from l7proxy.agent.client import Client, agent_action


def register(sub) -> None:
    p = sub.add_parser("identity", help="security identities (via the agent)")
    isub = p.add_subparsers(dest="identity_command", metavar="ACTION", required=True)
    ls = isub.add_parser("list", help="list identities and their labels")
    agent_action(ls, _list, outputs=("table", "json"))


def _list(args) -> int:
    ids = Client(args.socket).call("identity.list")
    if args.output == "json":
        print(json.dumps(ids, indent=2))
        return 0
    print(f"{'ID':<10}LABELS")
    for ident in ids:
        labels = ident["labels"] or [""]
        print(f"{ident['id']:<10}{labels[0]}")
        for label in labels[1:]:
            print(f"{'':<10}{label}")
    return 0
