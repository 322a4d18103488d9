"""`l7proxy gateway`: enforce CiliumNetworkPolicy at L7 in front of a fixed upstream."""

from __future__ import annotations

import argparse
import sys

from l7proxy.config import (
    PROTOCOLS,
    GatewayConfig,
    HostPort,
    ListenerConfig,
    PeerConfig,
    ProxyConfig,
    load_yaml,
)
from l7proxy.log import log
from parsers.http_path import ESCAPED_SLASH_MODES, KEEP, KEEP_WARNING


def register(sub) -> None:
    p = sub.add_parser(
        "gateway",
        help="L7 policy gateway in front of a fixed upstream (no BPF, no root)",
        description="Listen on HOST:PORT, apply the ingress policy of the endpoint named by "
        "--labels to every connection (source identity from --peer CIDRs, else world; policy "
        "port = the listener port), and forward allowed requests to --upstream.",
    )
    p.add_argument("--listen", type=HostPort.parse, help="HOST:PORT to accept clients on")
    p.add_argument("--upstream", type=HostPort.parse, help="HOST:PORT of the protected service")
    p.add_argument("--policy", action="append", default=[], metavar="FILE", help="policy YAML")
    p.add_argument("--labels", help="labels of the protected endpoint: k=v[,k=v...]")
    p.add_argument(
        "--peer",
        action="append",
        default=[],
        type=PeerConfig.parse,
        metavar="CIDR=k=v[,k=v...]",
        help="labels of clients from CIDR (longest prefix wins; others are world)",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default=None, help="default: http")
    p.add_argument("--admin", type=HostPort.parse, help="HOST:PORT for /metrics /healthz /policy")
    p.add_argument("--flow-log", metavar="FILE|-", help="one Hubble-shaped JSON line per request")
    p.add_argument("--workers", type=int, default=None, help="worker processes (SO_REUSEPORT)")
    p.add_argument("--deny-message", help=r"403 body (default 'Access denied\r\n')")
    p.add_argument(
        "--advertise-host",
        metavar="HOST",
        help="host a Kafka listener on 0.0.0.0 advertises in broker addresses (default 127.0.0.1)",
    )
    p.add_argument(
        "--path-escaped-slashes",
        choices=ESCAPED_SLASH_MODES,
        default=None,
        help="%%2F, %%5C and \\ in request paths: unescape (default: judged and forwarded as /), "
        "reject (400), keep (Envoy's KEEP_UNCHANGED; UNSAFE if the backend decodes them)",
    )
    p.add_argument("-c", "--config", metavar="CONFIG.yaml", help="config file (flags win)")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> GatewayConfig:
    base = load_yaml(args.config) if args.config else {}
    listeners = list(base.get("listeners", []))
    if args.listen or args.upstream:
        if not (args.listen and args.upstream):
            raise ValueError("--listen and --upstream go together")
        listeners = [ListenerConfig(args.listen, args.upstream, args.protocol or "http")]
    elif args.protocol:
        listeners = [ListenerConfig(lc.listen, lc.upstream, args.protocol) for lc in listeners]
    limits = dict(base.get("limits", {}))
    deny = args.deny_message if args.deny_message is not None else base.get("deny_message")
    if deny is not None:
        limits["deny_message"] = deny
    if getattr(args, "path_escaped_slashes", None):
        limits["path_escaped_slashes"] = args.path_escaped_slashes
    return GatewayConfig(
        listeners=tuple(listeners),
        policy_paths=tuple(args.policy or base.get("policy_paths", [])),
        labels=args.labels or base.get("labels", ""),
        peers=tuple(base.get("peers", [])) + tuple(args.peer),
        admin=args.admin or base.get("admin"),
        flow_log=args.flow_log if args.flow_log is not None else base.get("flow_log"),
        workers=args.workers if args.workers is not None else base.get("workers", 1),
        proxy=ProxyConfig(**limits),
        advertise_host=getattr(args, "advertise_host", None) or base.get("advertise_host"),
    )


def run(args: argparse.Namespace) -> int:
    from l7proxy.gateway import run_gateway

    try:
        cfg = build_config(args)
        cfg.validate()
    except (ValueError, OSError, TypeError) as exc:
        print(f"l7proxy gateway: {exc}", file=sys.stderr)
        return 2
    if cfg.proxy.path_escaped_slashes == KEEP:
        log(KEEP_WARNING)
    return run_gateway(cfg)
