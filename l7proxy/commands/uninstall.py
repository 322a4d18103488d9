"""`l7proxy uninstall`: remove everything agents left in the kernel (pinned maps and programs,
tc filters and the clsact they sit in, cgroup hooks, the proxy routing rule, the proxy worker)."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "uninstall",
        help="remove everything the agent left in the kernel (also after kill -9)",
        description="Remove what agents leave in the kernel when they stop (on purpose: a "
        "restarted agent re-opens it): pinned BPF maps and programs, tc filters and clsact on "
        "endpoint veths, cgroup hooks, the policy-routing rule for proxied packets and the "
        "proxy worker process. Found from what the kernel shows, so it also works after the "
        "agent was killed. Refuses while an agent runs (with --bpf-dir: the agent using it; "
        "stop it first, or --force). Endpoints' "
        "network namespaces and veths stay (delete endpoints before stopping the agent). "
        "Running it again removes nothing.",
    )
    p.add_argument(
        "--bpf-dir",
        default=None,
        help="only the datapath pinned here (an agent's --bpf-dir); default: every one found",
    )
    p.add_argument(
        "--state-dir",
        default=None,
        help="with --bpf-dir: also stop the proxy worker recorded in this agent's state dir",
    )
    p.add_argument("--force", action="store_true", help="go on although an agent is running")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.bpf_dir is not None and not os.path.isabs(args.bpf_dir):
        print(
            f"l7proxy uninstall: error: --bpf-dir {args.bpf_dir!r} is relative: give the "
            "agent's pin directory, e.g. /sys/fs/bpf/l7proxy/default",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() != 0:
        print("error: uninstall needs root (BPF pins, tc, cgroups)", file=sys.stderr)
        return 1
    from l7proxy.agent import kernel_cleanup

    pin_dir = Path(os.path.normpath(args.bpf_dir)) if args.bpf_dir else None
    agents = kernel_cleanup.running_agents(pin_dir)
    if agents and not args.force:
        pids = ", ".join(f"{pid} ({d or 'no BPF'})" for pid, d in sorted(agents.items()))
        print(
            f"error: an l7proxy agent is running: pid {pids}; stop it first "
            "(its state stays for a restart until you uninstall), or pass --force",
            file=sys.stderr,
        )
        return 1
    for pid, d in sorted(agents.items()):
        print(f"warning: agent pid {pid} still runs ({d or 'no BPF'}); its kernel state goes")
    state_dir = Path(args.state_dir) if args.state_dir else None
    report = kernel_cleanup.uninstall(pin_dir, state_dir)
    for line in report.removed:
        print(f"removed {line}")
    for line in report.kept:
        print(f"kept {line}")
    if not report.removed:
        print("nothing to remove")
    return 0
