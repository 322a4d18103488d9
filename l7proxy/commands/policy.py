"""`l7proxy policy validate FILE...` and `l7proxy policy trace ...` (the policy engine's CLI).

validate: exit 0 when every file is valid (warnings allowed), 1 otherwise; each problem is printed
as `FILE:LINE: FIELD: reason`. trace: exit 0 for ALLOWED and DENIED alike, 2 on bad input.
"""

from __future__ import annotations

import json
import sys

from l7proxy.policy_files import load_paths
from policies.kafka_keys import api_key_number
from policies.trace import (
    HttpRequest,
    KafkaRequest,
    TraceInputError,
    parse_peer,
    parse_port,
    trace,
)


def register(sub) -> None:
    parser = sub.add_parser(
        "policy",
        help="validate and trace Cilium network policies",
        description="Validate CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy / "
        "NetworkPolicy files and trace whether a flow would pass.",
    )
    psub = parser.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    validate = psub.add_parser("validate", help="check policy files; exit 1 on any error")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.add_argument("-q", "--quiet", action="store_true", help="do not print warnings")
    validate.add_argument("-o", "--output", choices=("text", "json"), default="text")
    validate.set_defaults(func=_validate)

    tr = psub.add_parser(
        "trace",
        help="explain whether a flow is allowed (egress of the source, ingress of the destination, L7)",
    )
    tr.add_argument("-p", "--policy", action="append", default=[], metavar="FILE")
    tr.add_argument("--src", help="source labels, e.g. app=web,k8s:team=a or reserved:world")
    tr.add_argument("--dst", help="destination labels")
    tr.add_argument("--src-ip")
    tr.add_argument("--dst-ip")
    tr.add_argument("--src-endpoint", help="take the source from the running agent")
    tr.add_argument("--dst-endpoint", help="take the destination from the running agent")
    tr.add_argument("--socket", help="agent socket for --src-endpoint/--dst-endpoint")
    tr.add_argument("--dport", required=True, metavar="PORT[/PROTO]")
    tr.add_argument("--http", nargs=2, metavar=("METHOD", "PATH"))
    tr.add_argument("--host", default="")
    tr.add_argument("--header", action="append", default=[], metavar="'Name: value'")
    tr.add_argument("--kafka-api-key", metavar="NAME|NUMBER")
    tr.add_argument("--kafka-api-version", type=int, default=0, metavar="N")
    tr.add_argument("--kafka-topic", action="append", default=[], metavar="T")
    tr.add_argument("--kafka-client-id", metavar="ID")
    tr.add_argument("--dns", metavar="NAME", help="a DNS query: forwarded or REFUSED?")
    tr.add_argument(
        "--fqdn", metavar="NAME", help="the destination IP (--dst-ip) was a DNS answer for NAME"
    )
    tr.add_argument("-o", "--output", choices=("text", "json"), default="text")
    tr.set_defaults(func=_trace)

    try:
        from l7proxy.commands.policy_live import register_live
    except ImportError:  # the agent's actions are optional
        return
    register_live(psub)


def _validate(args) -> int:
    result = load_paths(args.files)
    if args.output == "json":
        print(
            json.dumps(
                {
                    "valid": result.ok,
                    "rules": len(result.rules),
                    "diagnostics": [d.to_dict() for d in result.diagnostics],
                },
                indent=2,
            )
        )
        return 0 if result.ok else 1
    for diag in result.diagnostics:
        if diag.is_error:
            print(str(diag))
        elif not args.quiet:
            print(f"{diag} (warning)")
    if result.ok:
        print(f"{len(result.files)} file(s) valid, {len(result.rules)} rule(s)", file=sys.stderr)
        return 0
    print(f"{len(result.errors)} error(s)", file=sys.stderr)
    return 1


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise TraceInputError(f"bad --header {text!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def _trace(args) -> int:
    live = None
    try:
        paths = list(args.policy)
        src_text, dst_text, src_ip, dst_ip = args.src, args.dst, args.src_ip, args.dst_ip
        if args.src_endpoint or args.dst_endpoint:
            if not (args.src_endpoint and args.dst_endpoint):
                raise TraceInputError("--src-endpoint and --dst-endpoint go together")
            from l7proxy.commands.policy_live import live_trace_inputs

            try:
                live = live_trace_inputs(args.socket, args.src_endpoint, args.dst_endpoint)
            except Exception as exc:  # the agent's errors are input errors here
                raise TraceInputError(str(exc)) from None
            paths += live.paths
            src_text, dst_text = live.src_labels, live.dst_labels
            src_ip, dst_ip = src_ip or live.src_ip, dst_ip or live.dst_ip
        if not paths:
            raise TraceInputError("no policy files (-p FILE)")
        if not src_text or not dst_text:
            raise TraceInputError("--src and --dst are required")
        src = parse_peer(src_text, src_ip)
        dst = parse_peer(dst_text, dst_ip)
        port, proto = parse_port(args.dport)
        http = None
        if args.http:
            headers = tuple(_header(h) for h in args.header)
            http = HttpRequest(args.http[0], args.http[1], args.host, headers)
        kafka = None
        if args.kafka_api_key is not None:
            key = api_key_number(args.kafka_api_key)
            if key is None:
                raise TraceInputError(f"unknown Kafka API key {args.kafka_api_key!r}")
            kafka = KafkaRequest(
                key, args.kafka_api_version, tuple(args.kafka_topic), args.kafka_client_id
            )
        elif args.kafka_topic or args.kafka_client_id:
            raise TraceInputError("--kafka-topic/--kafka-client-id need --kafka-api-key")
        if sum(x is not None for x in (http, kafka, args.dns)) > 1:
            raise TraceInputError("give one of --http, --kafka-api-key or --dns")
        loaded = load_paths(paths)
        if not loaded.ok:
            for diag in loaded.errors:
                print(str(diag), file=sys.stderr)
            raise TraceInputError("the policy files have errors")
        named = live.named_ports if live is not None else None
        result = trace(
            loaded.rules, src, dst, port, proto, http, kafka, named_ports=named,
            dns=args.dns, fqdn=args.fqdn,
        )  # fmt: skip
    except TraceInputError as exc:
        print(f"policy trace: {exc}", file=sys.stderr)
        return 2
    finally:
        if live is not None:
            live.tmpdir.cleanup()
    if args.output == "json":
        print(json.dumps(result.to_dict(), indent=2))
    else:
        for line in result.log:
            print(line)
    return 0
