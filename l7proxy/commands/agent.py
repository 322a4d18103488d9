"""`l7proxy agent`: the node daemon (root) with its local API on a unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from l7proxy.agent.client import DEFAULT_SOCKET, SOCKET_ENV


def register(sub) -> None:
    p = sub.add_parser(
        "agent",
        help="run the node agent: endpoints, identities, policy, BPF datapath, proxy workers",
        description="The node agent. Owns endpoints (network namespaces with veth), identities, "
        "the policy repository, the BPF programs and maps, and the proxy workers. The CLI talks "
        "to it over a unix socket. State persists in SQLite under --state-dir.",
    )
    p.add_argument("--state-dir", default="/var/lib/l7proxy", help="where state.db lives")
    p.add_argument(
        "--socket",
        default=os.environ.get(SOCKET_ENV, DEFAULT_SOCKET),
        help=f"API socket path (default ${SOCKET_ENV} or {DEFAULT_SOCKET})",
    )
    p.add_argument("--pool", default="10.200.0.0/16", help="the node's endpoint IP pool (CIDR)")
    p.add_argument(
        "--netns-prefix",
        default="",
        help="prefix for the namespaces the agent creates (endpoint NAME -> netns PREFIX+NAME)",
    )
    p.add_argument("--mode", choices=("node", "sidecar"), default="node", help="proxy deployment")
    p.add_argument(
        "--proxy-worker",
        choices=("inline", "process"),
        default="inline",
        help="node mode: run the proxy in the agent, or in a worker process that keeps its "
        "connections across agent restarts",
    )
    p.add_argument("--admin", metavar="HOST:PORT", help="serve /metrics, /healthz, /policy here")
    p.add_argument("--no-bpf", action="store_true", help="do not load BPF (no kernel enforcement)")
    p.add_argument("--bpf-dir", default=None, help="pin directory under /sys/fs/bpf")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=run)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def run(args) -> int:
    if os.geteuid() != 0:
        print("error: the agent needs root (network namespaces, veth, BPF)", file=sys.stderr)
        return 1
    from l7proxy.agent.daemon import Agent, AgentConfig

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    config = AgentConfig(
        state_dir=Path(args.state_dir),
        socket=Path(args.socket),
        pool=args.pool,
        netns_prefix=args.netns_prefix,
        mode=args.mode,
        admin=_hostport(args.admin) if args.admin else None,
        bpf=not args.no_bpf,
        bpf_dir=args.bpf_dir,
        proxy_worker=args.proxy_worker,
    )
    # uvloop runs the agent's own loop (with SO_MARK for proxy upstreams, see agent/loop.py),
    # but the global policy stays asyncio's: pyroute2 opens its own loops in worker threads for
    # netlink sockets, which uvloop cannot handle.
    from l7proxy.agent.loop import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(Agent(config).run_forever())
    return 0
