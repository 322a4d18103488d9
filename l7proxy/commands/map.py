"""`l7proxy map`: the service dependency map as JSON or Graphviz DOT, or served live.

From a running gateway or agent (`--admin HOST:PORT`, its `/map.json`), or from a flow log
(`--flow-log FILE`, one Hubble JSON flow per line, `-` for stdin). With `--serve HOST:PORT` the
flow log is followed as it grows and the live page is served at `http://HOST:PORT/map`, for a
gateway run without `--admin` or a log copied from elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import urllib.error
import urllib.request

from l7proxy.depmap import DepMap, mount, to_dot
from l7proxy.depmap.follow import follow, parse_line

FETCH_TIMEOUT = 10.0


def register(sub) -> None:
    p = sub.add_parser("map", help="print or serve the service dependency map (JSON or DOT)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--admin", metavar="HOST:PORT", help="a gateway's or agent's admin port")
    source.add_argument("--flow-log", metavar="FILE", help="a flow log (JSON lines; - for stdin)")
    p.add_argument("-o", "--output", choices=("json", "dot"), default="json")
    p.add_argument(
        "--serve",
        metavar="HOST:PORT",
        help="with --flow-log FILE: follow the file and serve the live page (port 0 = any)",
    )
    p.set_defaults(func=run)


def fetch_map(admin: str) -> dict:
    url = admin if admin.startswith(("http://", "https://")) else f"http://{admin}"
    with urllib.request.urlopen(url.rstrip("/") + "/map.json", timeout=FETCH_TIMEOUT) as resp:
        return json.load(resp)


def read_flow_log(lines) -> tuple[dict, int]:
    """Aggregate a flow log; returns the map and the count of lines that were not JSON flows."""
    depmap = DepMap()
    bad = 0
    for line in lines:
        if not line.strip():
            continue
        flow = parse_line(line.encode() if isinstance(line, str) else line)
        if flow is None or not depmap.add(flow):
            bad += 1
    return depmap.to_dict(), bad


async def serve(listen: str, path: str) -> None:
    from l7proxy.admin import AdminServer

    host, _, port = listen.rpartition(":")
    admin = AdminServer()
    service = mount(admin)
    bound_host, bound_port = await admin.start(host or "127.0.0.1", int(port))
    follower = asyncio.get_running_loop().create_task(follow(path, service.feed))
    try:
        print(f"Service dependency map: http://{bound_host}:{bound_port}/map", flush=True)
        await asyncio.Event().wait()  # until Ctrl-C or SIGTERM
    finally:
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await admin.close()


def run(args) -> int:
    if args.serve:
        if not args.flow_log or args.flow_log == "-":
            print("l7proxy map: --serve needs --flow-log FILE", file=sys.stderr)
            return 2
        asyncio.run(serve(args.serve, args.flow_log))
        return 0
    if args.admin:
        try:
            graph = fetch_map(args.admin)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            print(f"l7proxy map: cannot read {args.admin}/map.json: {exc}", file=sys.stderr)
            return 1
    else:
        try:
            if args.flow_log == "-":
                graph, bad = read_flow_log(sys.stdin)
            else:
                with open(args.flow_log, encoding="utf-8") as fh:
                    graph, bad = read_flow_log(fh)
        except OSError as exc:
            print(f"l7proxy map: {exc}", file=sys.stderr)
            return 1
        if bad:
            print(f"l7proxy map: skipped {bad} line(s) that are not flows", file=sys.stderr)
    if args.output == "dot":
        sys.stdout.write(to_dot(graph))
    else:
        json.dump(graph, sys.stdout, indent=1)
        sys.stdout.write("\n")
    return 0
