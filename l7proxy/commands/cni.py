"""`l7proxy cni install`: put the CNI plugin and a network list where a container runtime finds
them (docs/cni.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from l7proxy.agent.client import default_socket


def register(sub) -> None:
    p = sub.add_parser("cni", help="the CNI plugin: containers become the agent's endpoints")
    csub = p.add_subparsers(dest="cni_command", metavar="ACTION", required=True)
    i = csub.add_parser("install", help="install the l7proxy-cni plugin and a network list")
    i.add_argument("--bin-dir", default="/usr/lib/cni", help="CNI plugin dir (default %(default)s)")
    i.add_argument("--conf-dir", default="/etc/cni/net.d", help="CNI network config dir")
    i.add_argument("--network", default="l7proxy", help="network name (podman --network NAME)")
    i.add_argument("--socket", default=None, help="the agent's API socket the plugin calls")
    i.add_argument("--runtime", default="podman", help="podman (labels from its state) or cni")
    i.add_argument(
        "--podman-root",
        default="/var/lib/containers/storage",
        help="podman's storage root (its --root); the plugin reads labels from libpod/bolt_state.db",
    )
    i.add_argument(
        "--chain",
        action="append",
        default=[],
        choices=("portmap", "bandwidth"),
        help="a standard plugin to run after ours (repeatable)",
    )
    i.set_defaults(func=_install)


def _install(args) -> int:
    from l7proxy.cni.install import install, network_list

    if "/" in args.network or not args.network:
        print(f"error: bad network name {args.network!r}", file=sys.stderr)
        return 2
    netlist = network_list(
        args.network,
        args.socket or default_socket(),
        runtime=args.runtime,
        podman_state=str(Path(args.podman_root) / "libpod" / "bolt_state.db"),
        chain=tuple(args.chain),
    )
    plugin, conf = install(Path(args.bin_dir), Path(args.conf_dir), netlist)
    print(f"installed {plugin} and {conf} (network {args.network!r})")
    return 0
