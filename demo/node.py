"""Node mode, with root and BPF: each ship and service is an endpoint of one agent, in its own
network namespace; the kernel enforces L3/L4 and the agent's node proxy L7.

`run_story` runs the parts on the agent `node_session.session` started, with `l7proxy observe`
tables and the metrics in between.
"""

from __future__ import annotations

import time

from demo import grpc_part, kafka_part, starwars
from demo.node_session import NodeRun
from demo.story import Story
from l7proxy.agent.flowlog import table

METRICS_SHOWN = (
    "drop_count_total",
    "forward_count_total",
    "policy_l7_total",
    "proxy_redirects",
    "policy_change_total",
    "endpoint_count",
    "identity_count",
)


def flows_table(story: Story, run: NodeRun, title: str, exclude: frozenset = frozenset()) -> set:
    """Print the flows `l7proxy observe` has (folded, forwarded L3/L4 events left out); return
    the keys of those shown so a later table can skip them."""
    story.step(f"{title}, as `l7proxy observe` sees them (BPF L3/L4 events and proxy L7 flows)")
    time.sleep(0.3)
    flows = run.agent.client.call("observe", last=10_000)
    keys = {(f.get("time"), f.get("Summary")) for f in flows}
    fresh = [f for f in flows if (f.get("time"), f.get("Summary")) not in exclude]
    shown = [f for f in fresh if f.get("verdict") != "FORWARDED" or f.get("l7")]
    print(table(shown, collapse=True))
    story.say(f"({len(fresh)} flows; forwarded L3/L4 events left out, identical ones folded)")
    return keys


def show_metrics(story: Story, run: NodeRun) -> None:
    story.step("Metrics (Cilium's names)")
    for line in run.agent.client.call("metrics").splitlines():
        if line.startswith(METRICS_SHOWN):
            print(f"    {line}")


def run_story(story: Story, run: NodeRun, extras: bool = True) -> None:
    """Star Wars, then (with `extras`) Kafka and gRPC, on endpoints of the one agent."""
    starwars.node_part(story, run)
    star_wars = flows_table(story, run, "The Star Wars flows")
    if not extras:
        return
    story.step("Kafka and gRPC endpoints: the empire's broker, its clients, Cloud City's doors")
    kafka_part.node_setup(story, run)
    grpc_part.node_setup(story, run)
    kafka_part.node_checks(story, run)
    grpc_part.node_checks(story, run)
    show_metrics(story, run)
    flows_table(story, run, "The Kafka and gRPC flows", exclude=frozenset(star_wars))
