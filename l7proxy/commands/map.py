"""`l7proxy map`: the service dependency map as JSON or Graphviz DOT.

From a running gateway or agent (`--admin HOST:PORT`, its `/map.json`), or from a flow log
(`--flow-log FILE`, one Hubble JSON flow per line, `-` for stdin).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

from l7proxy.depmap import DepMap, to_dot

FETCH_TIMEOUT = 10.0


def register(sub) -> None:
    p = sub.add_parser("map", help="print the service dependency map (JSON or DOT)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--admin", metavar="HOST:PORT", help="a gateway's or agent's admin port")
    source.add_argument("--flow-log", metavar="FILE", help="a flow log (JSON lines; - for stdin)")
    p.add_argument("-o", "--output", choices=("json", "dot"), default="json")
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
        line = line.strip()
        if not line:
            continue
        try:
            flow = json.loads(line)
        except ValueError:
            bad += 1
            continue
        # `hubble observe -o json` wraps each flow as {"flow": {...}}; accept both.
        if isinstance(flow, dict) and isinstance(flow.get("flow"), dict):
            flow = flow["flow"]
        if not isinstance(flow, dict) or not depmap.add(flow):
            bad += 1
    return depmap.to_dict(), bad


def run(args) -> int:
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
