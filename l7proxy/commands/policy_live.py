"""`l7proxy policy import|get|delete`: the agent's policy repository.

The `policy` command itself (with `validate` and `trace`) belongs to the policy engine in
`commands/policy.py`. It calls `register_live(subparsers)` from here to add these actions; if it
does not, `register` attaches them to its parser (or creates `policy` when that module is absent).
`live_trace_inputs` gives `policy trace --src-endpoint/--dst-endpoint` the live state.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from l7proxy.agent.client import Client, agent_action

_MARK = "_l7proxy_live_registered"


def register(sub) -> None:
    parser = sub.choices.get("policy")
    if parser is None:
        parser = sub.add_parser("policy", help="policy repository of the agent")
        register_live(parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True))
        return
    for action in parser._actions:  # the policy engine's own subparsers
        if isinstance(action, argparse._SubParsersAction):
            register_live(action)
            return


def register_live(psub) -> None:
    """Add import/get/delete to the `policy` subparsers (idempotent)."""
    if getattr(psub, _MARK, False):
        return
    setattr(psub, _MARK, True)

    imp = psub.add_parser(
        "import", help="import policy files into the agent (atomic; prints the new revision)"
    )
    imp.add_argument("files", nargs="+", metavar="FILE")
    agent_action(imp, _import)

    get = psub.add_parser("get", help="print the agent's policy repository")
    agent_action(get, _get, outputs=("yaml", "json"))

    delete = psub.add_parser("delete", help="delete policies by name, or --all")
    which = delete.add_mutually_exclusive_group(required=True)
    which.add_argument("name", nargs="?", help="metadata.name (or the key kind/namespace/name)")
    which.add_argument("--all", action="store_true")
    agent_action(delete, _delete)


def _import(args) -> int:
    import policies
    from l7proxy.policy_files import read_policy_file

    files = []
    for path in args.files:
        try:  # bounded: a file past the engine's size limit is refused before it is read whole
            files.append({"name": path, "text": read_policy_file(path)})
        except OSError as exc:
            print(f"{path}:0: file: {exc.strerror}", file=sys.stderr)
            return 1
        except ValueError as exc:
            print(f"{path}:0: file: {exc}", file=sys.stderr)
            return 1
    # Validate here first so problems name the user's files and lines; the agent checks again
    # on the merged set before it stores anything.
    try:
        policies.load_sources([(f["name"], f["text"]) for f in files], strict=True)
    except policies.PolicyError as exc:
        for diag in exc.diagnostics:
            print(str(diag), file=sys.stderr)
        print("policy import: nothing changed", file=sys.stderr)
        return 1
    result = Client(args.socket).call("policy.import", files=files)
    print(f"Revision: {result['revision']}")
    return 0


def _get(args) -> int:
    result = Client(args.socket).call("policy.get")
    if args.output == "json":
        result = dict(result)
        result.pop("yaml", None)
        print(json.dumps(result, indent=2))
    else:
        print(result["yaml"], end="")
        print(f"# Revision: {result['revision']}")
    return 0


def _delete(args) -> int:
    client = Client(args.socket)
    result = (
        client.call("policy.delete", all=True)
        if args.all
        else client.call("policy.delete", name=args.name)
    )
    for key in result["deleted"]:
        print(f"deleted {key}")
    print(f"Revision: {result['revision']}")
    return 0


@dataclass(frozen=True, slots=True)
class LiveTrace:
    paths: list[str]  # one file per stored document (in `tmpdir`)
    src_labels: str
    src_ip: str
    dst_labels: str
    dst_ip: str
    revision: int
    tmpdir: tempfile.TemporaryDirectory
    # {"src"|"dst": {port name: number}}: the endpoints' named ports, for rules on a named port
    named_ports: dict = field(default_factory=dict)


def live_trace_inputs(socket: str | None, src_endpoint: str, dst_endpoint: str) -> LiveTrace:
    """The agent's policies (as files) and the two endpoints' labels and IPs, for `policy trace`.

    Raises l7proxy.agent.client.AgentError for an unknown endpoint or an unreachable agent.
    Keep the returned object alive while the paths are used (it owns the temporary directory).
    """
    from l7proxy.agent.client import AgentError

    live = Client(socket).call("policy.live")
    eps = live["endpoints"]
    for name in (src_endpoint, dst_endpoint):
        if name not in eps:
            raise AgentError(f"no endpoint named {name}")
    tmp = tempfile.TemporaryDirectory(prefix="l7proxy-trace-")
    paths = []
    for i, doc in enumerate(live["documents"]):
        path = Path(tmp.name) / f"{i:04d}-{doc['key'].replace('/', '_')}.yaml"
        path.write_text(doc["text"])
        paths.append(str(path))
    src, dst = eps[src_endpoint], eps[dst_endpoint]
    return LiveTrace(
        paths,
        ",".join(src["labels"]),
        src["ip"],
        ",".join(dst["labels"]),
        dst["ip"],
        live["revision"],
        tmp,
        {
            side: {p["name"]: p["port"] for p in ep.get("ports", ())}
            for side, ep in (("src", src), ("dst", dst))
        },
    )
