"""`l7proxy observe`: L3/L4 events from BPF and L7 flows from the proxy, in one stream.

From the agent by default; `--file` reads a flow log written by `l7proxy gateway --flow-log`
instead (gateway mode has no agent), with the same filters and output forms.
"""

from __future__ import annotations

import json
import sys
import time

from l7proxy.agent.client import Client, agent_action
from l7proxy.agent.flowlog import PROTOCOLS, VERDICTS, FlowFilter, compact


def register(sub) -> None:
    p = sub.add_parser("observe", help="show flows (Hubble shape), like `hubble observe`")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    p.add_argument("--last", type=int, default=None, metavar="N", help="the last N flows")
    p.add_argument("--verdict", choices=VERDICTS)
    p.add_argument("--from-label", action="append", default=[], metavar="K=V")
    p.add_argument("--to-label", action="append", default=[], metavar="K=V")
    p.add_argument("--protocol", choices=PROTOCOLS)
    p.add_argument("-o", "--output", choices=("compact", "json"), default="compact")
    p.add_argument("--file", metavar="FLOWLOG", help="read a gateway's flow log, not the agent")
    agent_action(p, _observe)


def _filter(args) -> FlowFilter:
    return FlowFilter(
        verdict=args.verdict,
        from_labels=tuple(args.from_label),
        to_labels=tuple(args.to_label),
        protocol=args.protocol,
    )


def _print(flow: dict, output: str) -> None:
    line = json.dumps(flow, separators=(",", ":")) if output == "json" else compact(flow)
    print(line, flush=True)


def _observe(args) -> int:
    flt = _filter(args)
    if args.file:
        return _observe_file(args, flt)
    client = Client(args.socket)
    try:
        if args.follow:
            for item in client.stream("observe.follow", filter=flt.to_json(), last=args.last or 0):
                if "flow" in item:  # the first line only says the agent subscribed us
                    _print(item["flow"], args.output)
        else:
            last = args.last if args.last is not None else 20
            for flow in client.call("observe", filter=flt.to_json(), last=last):
                _print(flow, args.output)
    except BrokenPipeError:
        sys.stderr.close()
    return 0


def _observe_file(args, flt: FlowFilter) -> int:
    with open(args.file) as fh:
        flows = [f for f in (_parse(line) for line in fh) if f is not None and flt.matches(f)]
        last = args.last if args.last is not None else (0 if args.follow else 20)
        for flow in flows[-last:] if last else []:
            _print(flow, args.output)
        while args.follow:
            line = fh.readline()
            if not line:
                time.sleep(0.2)
                continue
            flow = _parse(line)
            if flow is not None and flt.matches(flow):
                _print(flow, args.output)
    return 0


def _parse(line: str) -> dict | None:
    try:
        flow = json.loads(line)
    except ValueError:
        return None
    return flow if isinstance(flow, dict) else None
