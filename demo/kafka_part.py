"""Kafka: the empire's broker (noida-db), produce and consume roles per topic
(demo/kafka_policy.yaml). HQ produces to deathstar-plans and empire-announce; an outpost consumes
empire-announce, may not produce to it and may not read deathstar-plans.

Node mode: the broker and both clients are endpoints of the agent; the node proxy enforces on the
redirected flows. Gateway mode: two `l7proxy gateway` listeners in front of the broker, one that
knows its clients as app=empire-hq and one that knows them as app=empire-outpost (on loopback
every client comes from 127.0.0.1, so the listener is what carries the identity).
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from demo import KAFKA_POLICY, broker
from demo.gateway import flow_rows, gateway_argv, show_flows, start_gateway
from demo.node_session import NodeRun
from demo.procs import Children, in_ns, module, wait_port
from demo.story import Story, run_cli, run_client
from l7proxy.platform import free_port

PORT = 9092
CLIENTS = {"empire-hq": "app=empire-hq", "empire-outpost": "app=empire-outpost"}
# Gateway mode: one listener per client identity.
LISTENERS = {"empire-hq": "127.0.9.1", "empire-outpost": "127.0.9.2"}


@dataclass(frozen=True, slots=True)
class Check:
    client: str
    verb: str  # produce | consume
    topic: str
    value: str | None  # what a produce sends
    want: str
    good: Callable[[str], bool]  # judges the line the client printed
    denied_by_proxy: bool = False  # the proxy refuses it and logs a DROPPED flow

    def args(self, bootstrap: str) -> list[str]:
        return [self.verb, bootstrap, self.topic, *([self.value] if self.value else [])]


CHECKS = (
    Check("empire-hq", "produce", "deathstar-plans", "exhaust port is 2 m wide", "produced",
          lambda s: s == "produced"),
    Check("empire-hq", "produce", "empire-announce", "the deathstar is operational", "produced",
          lambda s: s == "produced"),
    Check("empire-outpost", "consume", "empire-announce", None, "reads the announcement",
          lambda s: "operational" in s),
    Check("empire-outpost", "produce", "empire-announce", "rebels!",
          "refused (TopicAuthorizationFailed)",
          lambda s: s.startswith("refused") and "Authorization" in s),
    Check("empire-outpost", "consume", "deathstar-plans", None,
          "refused (TopicAuthorizationFailed): none of the plans reach it",
          lambda s: s.startswith("refused") and "Authorization" in s and "exhaust port" not in s,
          denied_by_proxy=True),
)  # fmt: skip


# -- node mode -----------------------------------------------------------------------------------


def node_setup(story: Story, run: NodeRun) -> None:
    """The broker and its clients as endpoints; the broker serves on its endpoint's IP."""
    run.create_endpoints(story, {"kafka": "app=kafka", **CLIENTS})
    data = broker.data_dir(run.agent.prefix)
    run.children.defer(lambda: broker.remove(data))
    argv = in_ns(run.netns("kafka"), broker.argv(data, PORT, host=run.ips["kafka"]))
    story.command(broker.shown(argv))
    run.children.start(argv)


def _wait_for_broker(run: NodeRun) -> None:
    probe = in_ns(run.netns("kafka"), module("clients", "probe", run.ips["kafka"], str(PORT)))
    if subprocess.run(probe, capture_output=True).returncode != 0:
        raise RuntimeError(f"the broker does not listen on {run.ips['kafka']}:{PORT}")


def node_checks(story: Story, run: NodeRun) -> None:
    _wait_for_broker(run)
    story.step("Kafka policy: produce and consume roles per topic (enforced by the node proxy)")
    story.show(KAFKA_POLICY)
    run_cli(story, run.env, "policy", "import", str(KAFKA_POLICY))
    bootstrap = f"{run.ips['kafka']}:{PORT}"
    for check in CHECKS:
        seen, _ = run_client(story, check.args(bootstrap), run.netns(check.client))
        story.expect(
            f"{check.client} {check.verb} {check.topic}", seen, check.want, check.good(seen)
        )
    denied = run.agent.client.call(
        "observe",
        filter={"verdict": "DROPPED", "protocol": "kafka", "from_labels": ["app=empire-outpost"]},
        last=1,
    )
    story.expect(
        "kafka flows",
        f"{'a' if denied else 'no'} DROPPED kafka flow from empire-outpost",
        "the proxy's denial is in observe",
        bool(denied),
    )


# -- gateway mode --------------------------------------------------------------------------------


def _dropped(flow_log: Path, topic: str) -> bool:
    """The gateway wrote a DROPPED Kafka flow naming this topic."""
    for flow in flow_rows(flow_log):
        kafka = (flow.get("l7") or {}).get("kafka") or {}
        if flow.get("verdict") == "DROPPED" and kafka.get("topic") == topic:
            return True
    return False


def _start(story: Story, children: Children, data: Path, flow_log: Path) -> None:
    """The broker on loopback and one gateway listener per client identity in front of it.
    A gateway advertises itself in Metadata, so the clients never go around it."""
    port = free_port()
    argv = broker.argv(data / "data", port)
    story.command(broker.shown(argv))
    children.start(argv)
    wait_port("127.0.0.1", port)
    for client, host in LISTENERS.items():
        argv = gateway_argv(
            f"{host}:{PORT}", f"127.0.0.1:{port}", KAFKA_POLICY, "app=kafka",
            [f"127.0.0.0/8={CLIENTS[client]}"], flow_log, protocol="kafka",
        )  # fmt: skip
        start_gateway(story, children, argv)


def _gateway_label(check: Check) -> str:
    """`empire-hq produces to deathstar-plans`, `empire-outpost consumes empire-announce`."""
    to = "to " if check.verb == "produce" else ""
    return f"{check.client} {check.verb}s {to}{check.topic}"


def gateway_part(story: Story, tag: str) -> None:
    story.step("Kafka: the empire's broker, produce and consume roles per topic (gateway mode)")
    story.say("HQ connects through a listener that knows it as app=empire-hq, outposts through")
    story.say("one that knows them as app=empire-outpost; both enforce demo/kafka_policy.yaml.")
    story.show(KAFKA_POLICY)
    children = Children()
    data = broker.data_dir(tag)
    children.defer(lambda: broker.remove(data))
    flow_log = data / "flows.jsonl"
    try:
        _start(story, children, data, flow_log)
        for check in CHECKS:
            seen, _ = run_client(story, check.args(f"{LISTENERS[check.client]}:{PORT}"))
            want, good = check.want, check.good(seen)
            if check.denied_by_proxy:
                want, good = f"{want} (Metadata refused)", good and _dropped(flow_log, check.topic)
            story.expect(_gateway_label(check), seen, want, good)
        show_flows(story, flow_log, "--verdict", "DROPPED", "--last", "3")
    finally:
        children.close()
