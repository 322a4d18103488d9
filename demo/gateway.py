"""Gateway mode, for hosts without root or BPF: `l7proxy gateway` on loopback in front of each
service, with the clients' identities given by `--peer` (or by the listener they use).
No kernel part runs here."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from demo.procs import Children, wait_port
from demo.story import Story, run_cli
from l7proxy.agent.flowlog import table


def gateway_argv(
    listen: str,
    upstream: str,
    policy: Path,
    labels: str,
    peers: list[str],
    flow_log: Path,
    protocol: str | None = None,
) -> list[str]:
    """`l7proxy gateway` arguments: enforce `policy` for the endpoint `labels` at `listen`."""
    argv = ["gateway", "--listen", listen, "--upstream", upstream]
    if protocol:
        argv += ["--protocol", protocol]
    argv += ["--policy", str(policy), "--labels", labels]
    for peer in peers:
        argv += ["--peer", peer]
    return [*argv, "--flow-log", str(flow_log)]


def start_gateway(
    story: Story, children: Children, argv: list[str], source: str | None = None
) -> None:
    """Print and start `l7proxy ARGV`; return once its listener accepts (from `source`)."""
    story.command(["l7proxy", *argv])
    children.start([sys.executable, "-m", "l7proxy", *argv])
    host, port = argv[argv.index("--listen") + 1].rsplit(":", 1)
    wait_port(host, int(port), source)


def show_flows(story: Story, flow_log: Path, *observe: str) -> None:
    """`l7proxy observe --file` on a gateway's flow log, as a user would run it."""
    time.sleep(0.3)  # the gateway writes a flow when the exchange ends
    run_cli(story, None, "observe", "--file", str(flow_log), *observe)


def flow_rows(flow_log: Path) -> list[dict]:
    return [json.loads(line) for line in flow_log.read_text().splitlines() if line]


def print_table(flow_log: Path) -> None:
    print(table(flow_rows(flow_log)), flush=True)
