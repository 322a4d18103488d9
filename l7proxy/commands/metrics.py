"""`l7proxy metrics`: the agent's Prometheus metrics (the same text its admin port serves)."""

from __future__ import annotations

from l7proxy.agent.client import Client, add_socket_arg, run


def register(sub) -> None:
    p = sub.add_parser("metrics", help="print the agent's Prometheus metrics")
    add_socket_arg(p)
    p.set_defaults(func=lambda a: run(lambda: print(Client(a.socket).call("metrics"), end="")))
