"""`l7proxy status`: the health of each part, the counts and the policy revision."""

from __future__ import annotations

import json

from l7proxy.agent.client import Client, agent_action


def register(sub) -> None:
    p = sub.add_parser("status", help="agent health, counts and policy revision")
    agent_action(p, _status, outputs=("text", "json"))


def _status(args) -> int:
    st = Client(args.socket).call("status")
    if args.output == "json":
        print(json.dumps(st, indent=2))
        return 0
    print(f"Mode:            {st['mode']}")
    for name, part in st["parts"].items():
        detail = f"   {part['detail']}" if part.get("detail") else ""
        print(f"{name.capitalize() + ':':<17}{part['state']}{detail}")
    counts = st["counts"]
    print(f"Endpoints:       {counts['endpoints']}")
    print(f"Identities:      {counts['identities']}")
    print(f"Policies:        {counts['policies']}")
    print(f"Flows seen:      {counts['flows']}")
    print(f"Policy revision: {st['policy_revision']}")
    print(f"IP pool:         {st['pool']} (router {st['router']})")
    if st.get("pool6"):
        print(f"IPv6 pool:       {st['pool6']} (router {st['router6']})")
    return 0
