"""The `l7proxy` command line: discovers subcommands in l7proxy.commands."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from l7proxy import __version__, commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="l7proxy",
        description="An L7-aware proxy with kernel redirection: identity-based L3/L4 policy in BPF, "
        "HTTP/1.1, HTTP/2/gRPC and Kafka enforcement in a uvloop proxy. "
        "Accepts Cilium's CiliumNetworkPolicy YAML unchanged.",
    )
    parser.add_argument(
        "--node",
        metavar="NAME",
        help="talk to this lab node's agent (`l7proxy lab up`): node1, node2, ...",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=lambda args: print(f"l7proxy {__version__}") or 0)
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.node or args.command == "cluster":
        from l7proxy.lab.state import select_node

        try:
            select_node(args.node)
        except LookupError as exc:
            print(f"l7proxy: error: --node {args.node}: {exc}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (head, less) went away: not an error of ours. Point stdout at /dev/null so
        # the interpreter's final flush doesn't raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
