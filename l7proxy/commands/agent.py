"""`l7proxy agent`: the node daemon (root) with its local API on a unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from l7proxy.agent.client import DEFAULT_SOCKET, SOCKET_ENV
from l7proxy.agent.ipam import DEFAULT_POOL6, IPPool
from parsers.http_path import ESCAPED_SLASH_MODES, KEEP, KEEP_WARNING, UNESCAPE

BPF_FS = Path("/sys/fs/bpf")
SUN_PATH_MAX = 107  # bytes of a unix socket path (sun_path is 108 with the terminating NUL)


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
        "--pool6",
        default="",
        help="an IPv6 pool (CIDR, /126 or larger) makes every endpoint dual stack; "
        f"'default' is {DEFAULT_POOL6}; unset: IPv4 only",
    )
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
    p.add_argument(
        "--bpf-dir",
        default=None,
        help="pin directory on the BPF filesystem (default /sys/fs/bpf/l7proxy/default)",
    )
    p.add_argument(
        "--host-routing",
        choices=("bpf", "legacy"),
        default="bpf",
        help="pod to pod on this node: delivered by the BPF programs (default), or 'legacy': "
        "forwarded by the host's stack, through its netfilter rules",
    )
    p.add_argument(
        "--sock-lb-cgroup",
        default="/sys/fs/cgroup/unified",
        metavar="PATH",
        help="services: the cgroup v2 directory whose processes get socket-level load "
        "balancing (default: the root, i.e. the host and every pod; '' turns it off)",
    )
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.add_argument(
        "--path-escaped-slashes",
        choices=ESCAPED_SLASH_MODES,
        default=UNESCAPE,
        help="%%2F, %%5C and \\ in request paths: unescape (default: judged and forwarded as /), "
        "reject (400), keep (Envoy's KEEP_UNCHANGED; UNSAFE if the backend decodes them)",
    )
    dns = p.add_argument_group("DNS proxy and toFQDNs (docs/dns.md)")
    dns.add_argument(
        "--dns-min-ttl", type=float, default=0, help="learned IPs stay at least this many seconds"
    )
    dns.add_argument(
        "--dns-max-ips-per-name",
        type=int,
        default=1000,
        help="unexpired IPs one endpoint keeps per name (the oldest expire first)",
    )
    dns.add_argument(
        "--dns-nice",
        type=int,
        default=-10,
        help="CPU nice value of the agent's event-loop thread, which answers DNS (default -10; "
        "0 leaves it alone)",
    )
    cluster = p.add_argument_group(
        "cluster mode",
        "identities, the ipcache, nodes, pod CIDRs and policies in etcd (docs/cluster.md)",
    )
    cluster.add_argument(
        "--kvstore", metavar="etcd://HOST:PORT[,HOST:PORT...]", help="join a cluster through etcd"
    )
    cluster.add_argument("--node-name", default="", help="this node's name in the cluster")
    cluster.add_argument(
        "--cluster-cidr", default="", help="pod addresses of the whole cluster, e.g. 10.252.0.0/16"
    )
    cluster.add_argument(
        "--node-cidr-mask-size", type=int, default=24, help="each node leases one /N of it (24)"
    )
    cluster.add_argument(
        "--cluster-cidr6", default="",
        help="dual stack: IPv6 pod addresses of the whole cluster, e.g. fd00:10:252::/56 "
        "(each node leases one /--node-cidr-mask-size6 of it and every pod gets both families)",
    )  # fmt: skip
    cluster.add_argument(
        "--node-cidr-mask-size6", type=int, default=64,
        help="each node leases one /N of --cluster-cidr6 (64)",
    )  # fmt: skip
    cluster.add_argument("--routing", choices=("tunnel", "native"), default="tunnel")
    cluster.add_argument(
        "--underlay-ip",
        default="",
        help="this node's address for other nodes (default: the "
        "source address of the route to the first etcd endpoint)",
    )
    cluster.add_argument(
        "--underlay-ip6", default="",
        help="with --cluster-cidr6 and native routing: this node's IPv6 address on the underlay, "
        "the next hop other nodes route its IPv6 pods via (default: a global IPv6 address on the "
        "device that holds --underlay-ip)",
    )  # fmt: skip
    cluster.add_argument(
        "--node-lease-ttl", type=int, default=15, metavar="S",
        help="seconds after which a silent node is removed everywhere (15)",
    )  # fmt: skip
    cluster.add_argument(
        "--identity-gc-interval", type=float, default=60.0, metavar="S",
        help="seconds between rounds of deleting identities no node references (60)",
    )  # fmt: skip
    p.set_defaults(func=run)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def fs_type(path: Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem `path` lies on (the longest mount point above it)."""
    if mounts is None:
        try:
            mounts = Path("/proc/self/mounts").read_text()
        except OSError:
            return None
    best, kind = "", None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, kind = point, fields[2]
    return kind


def pool6_of(text: str) -> str:
    """--pool6 as a CIDR ("default" names ipam.DEFAULT_POOL6, "" stays off)."""
    return DEFAULT_POOL6 if text == "default" else text


def argument_problem(args, mounts: str | None = None) -> str | None:
    """What is wrong with the agent's arguments, as one line that says what to do, or None.
    Checked before the agent touches anything (the kernel's errors came after attaching)."""
    try:
        IPPool(args.pool)
    except ValueError as exc:
        return f"--pool {args.pool!r}: {exc} (e.g. --pool 10.200.0.0/16)"
    if args.pool6:
        try:
            IPPool(pool6_of(args.pool6), 6)
        except ValueError as exc:
            return f"--pool6 {args.pool6!r}: {exc} (e.g. --pool6 {DEFAULT_POOL6})"
    if "/" in args.netns_prefix or "\0" in args.netns_prefix:
        return f"--netns-prefix {args.netns_prefix!r}: a namespace name cannot hold '/' (e.g. l7-)"
    if args.admin is not None:
        try:
            host, port = _hostport(args.admin)
        except ValueError:
            port = -1
        if not 0 <= port <= 65535:
            return (
                f"--admin {args.admin!r}: give HOST:PORT with a port 0-65535 (e.g. 127.0.0.1:9962)"
            )
    problem = cluster_problem(args)
    if problem:
        return problem
    state_dir = Path(args.state_dir)
    if state_dir.exists() and not state_dir.is_dir():
        return f"--state-dir {args.state_dir!r} is a file: give a directory (it holds state.db)"
    if len(os.fsencode(os.path.abspath(args.socket))) > SUN_PATH_MAX:
        return (
            f"--socket {args.socket!r}: a unix socket path is at most {SUN_PATH_MAX} bytes; "
            "give a shorter one"
        )
    if args.bpf_dir is not None and not args.no_bpf:
        pin_dir = Path(args.bpf_dir)
        example = BPF_FS / "l7proxy" / (pin_dir.name or "NAME")
        if not pin_dir.is_absolute():
            return f"--bpf-dir {args.bpf_dir!r} is relative: give a directory on the BPF filesystem, e.g. {example}"
        if pin_dir.exists() and not pin_dir.is_dir():
            return f"--bpf-dir {args.bpf_dir!r} is a file: give a directory, e.g. {example}"
        kind = fs_type(Path(os.path.normpath(pin_dir)), mounts)
        if kind not in (None, "bpf"):
            return (
                f"--bpf-dir {args.bpf_dir!r} is on a {kind} filesystem, not the BPF filesystem: "
                f"give a directory under a bpf mount, e.g. {example} "
                f"(mount one with: mount -t bpf bpf {BPF_FS})"
            )
    return None


def cluster_problem(args) -> str | None:
    kvstore = getattr(args, "kvstore", None)
    if not kvstore:
        return None
    from l7proxy.cluster import ipam
    from l7proxy.cluster.kvstore import parse_url

    try:
        parse_url(kvstore)
    except ValueError as exc:
        return f"--kvstore {exc}"
    if not args.node_name or "/" in args.node_name or len(args.node_name) > 63:
        return "--kvstore needs --node-name NAME (no '/', at most 63 characters), e.g. node1"
    if not args.cluster_cidr:
        return "--kvstore needs --cluster-cidr CIDR, e.g. --cluster-cidr 10.252.0.0/16"
    try:
        ipam.subnets(args.cluster_cidr, args.node_cidr_mask_size)
    except ValueError as exc:
        return str(exc)
    import ipaddress

    if args.underlay_ip:
        try:
            ipaddress.IPv4Address(args.underlay_ip)
        except ValueError:
            return f"--underlay-ip {args.underlay_ip!r}: give this node's IPv4 address"
    if args.pool6 and not args.cluster_cidr6:
        return (
            "--pool6 with --kvstore: pods' IPv6 addresses come from the cluster; give "
            "--cluster-cidr6 CIDR instead, e.g. --cluster-cidr6 fd00:10:252::/56"
        )
    if args.cluster_cidr6:
        try:
            ipam.subnets(args.cluster_cidr6, args.node_cidr_mask_size6, 6)
        except ValueError as exc:
            return str(exc)
    if args.underlay_ip6:
        try:
            ipaddress.IPv6Address(args.underlay_ip6)
        except ValueError:
            return f"--underlay-ip6 {args.underlay_ip6!r}: give this node's IPv6 address"
    if not 1 <= args.node_lease_ttl <= 86400:
        return f"--node-lease-ttl {args.node_lease_ttl}: give 1-86400 seconds"
    if args.identity_gc_interval <= 0:
        return "--identity-gc-interval: give a positive number of seconds"
    return None


def run(args) -> int:
    problem = argument_problem(args)
    if problem:
        print(f"l7proxy agent: error: {problem}", file=sys.stderr)
        return 2
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
        pool6=pool6_of(args.pool6),
        netns_prefix=args.netns_prefix,
        mode=args.mode,
        admin=_hostport(args.admin) if args.admin else None,
        bpf=not args.no_bpf,
        bpf_dir=args.bpf_dir,
        host_routing=args.host_routing,
        proxy_worker=args.proxy_worker,
        path_escaped_slashes=args.path_escaped_slashes,
        dns_min_ttl=args.dns_min_ttl,
        dns_max_ips_per_name=args.dns_max_ips_per_name,
        dns_nice=args.dns_nice,
        kvstore=args.kvstore,
        node_name=args.node_name,
        cluster_cidr=args.cluster_cidr,
        node_cidr_mask_size=args.node_cidr_mask_size,
        cluster_cidr6=args.cluster_cidr6,
        node_cidr_mask_size6=args.node_cidr_mask_size6,
        underlay_ip6=args.underlay_ip6,
        routing=args.routing,
        underlay_ip=args.underlay_ip,
        node_lease_ttl=args.node_lease_ttl,
        identity_gc_interval=args.identity_gc_interval,
        sock_lb_cgroup=args.sock_lb_cgroup,
    )
    if args.path_escaped_slashes == KEEP:
        logging.getLogger("l7proxy.agent").warning(KEEP_WARNING)
    # uvloop runs the agent's own loop (with SO_MARK for proxy upstreams, see agent/loop.py),
    # but the global policy stays asyncio's: pyroute2 opens its own loops in worker threads for
    # netlink sockets, which uvloop cannot handle.
    from l7proxy.agent.loop import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        try:
            runner.run(Agent(config).run_forever())
        except Exception as exc:
            if config.kvstore and type(exc).__name__ == "KVStoreDown":
                print(
                    f"l7proxy agent: error: {exc}: start etcd or check --kvstore {config.kvstore}",
                    file=sys.stderr,
                )
                return 1
            raise
    return 0
