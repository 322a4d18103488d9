"""`python -m demo` (`make demo`): pick node or gateway mode, run the parts (node mode ends with
the cluster part on a local lab), count the checks."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import demo
from demo import cluster_part, grpc_part, kafka_part, live_map, node, node_session, starwars
from demo.story import Story
from l7proxy.agent.datapath_choice import bpf_problem


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo", description=demo.__doc__.split("\n")[0])
    p.add_argument("--gateway", action="store_true", help="run only the gateway-mode part")
    p.add_argument("--keep", action="store_true", help="leave the agent and namespaces running")
    p.add_argument("--pool", default=os.environ.get("L7PROXY_DEMO_POOL", "10.251.10.0/24"))
    p.add_argument("--prefix", default=os.environ.get("L7PROXY_DEMO_PREFIX", "l7demo-"))
    p.add_argument("--no-extras", action="store_true", help="skip the Kafka and gRPC parts")
    p.add_argument(
        "--no-cluster", action="store_true", help="skip the cluster part (a 2-node local lab)"
    )
    p.add_argument(
        "--cluster-only", action="store_true", help="run only the cluster part (make demo-cluster)"
    )
    return p.parse_args(argv)


def report(story: Story, started: float) -> int:
    took = time.monotonic() - started
    print(f"\n{story.checks} checks, {len(story.failures)} unexpected, {took:.1f} s")
    for failure in story.failures:
        print(f"UNEXPECTED: {failure}")
    return 1 if story.failures else 0


def node_mode(story: Story, args: argparse.Namespace, started: float) -> int:
    print("Root and BPF present: real namespaces, BPF on the veths, node-mode proxy.")
    with node_session.session(story, args.pool, args.prefix, args.keep) as run:
        node.run_story(story, run, extras=not args.no_extras)
        if not args.no_cluster:
            cluster_part.cluster_part(story, keep=args.keep)
        code = report(story, started)
        if not args.keep:
            live_map.keep_up(run.map_url())
    return code


def cluster_only(
    story: Story, args: argparse.Namespace, started: float, problem: str | None
) -> int:
    if problem:
        print(f"The cluster part needs the kernel datapath: {problem}.", file=sys.stderr)
        return 1
    cluster_part.cluster_part(story, keep=args.keep, required=True)
    return report(story, started)


def gateway_mode(story: Story, args: argparse.Namespace, started: float) -> int:
    starwars.gateway_part(story)
    if args.no_extras:
        return report(story, started)
    parts = {
        "Kafka": lambda: kafka_part.gateway_part(story, args.prefix),
        "gRPC": lambda: grpc_part.gateway_part(story),
    }
    for name, part in parts.items():
        try:
            part()
        except (RuntimeError, OSError) as exc:  # one part that cannot start: the others still run
            story.fail(f"the {name} part: {exc}")
    return report(story, started)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    # SIGTERM (CI timeouts, kill) unwinds like Ctrl-C, so the finally blocks clean up.
    signal.signal(signal.SIGTERM, _interrupt)
    story = Story()
    started = time.monotonic()
    print("l7proxy demo: Cilium's Star Wars getting-started (deathstar, tiefighter, xwing)")
    problem = None if args.gateway else bpf_problem()
    try:
        if args.cluster_only:
            return cluster_only(story, args, started, problem)
        if args.gateway:
            print("Running the gateway-mode part only (--gateway).")
        elif problem:
            print(f"No kernel datapath here: {problem}. Running the gateway-mode part instead.")
        else:
            return node_mode(story, args, started)
        return gateway_mode(story, args, started)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a part could not start (agent, server, broker): say which
        print(f"\nthe demo could not continue: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
