"""The agent of a node-mode run, and what the demo started next to it.

`session` starts the agent (node mode, BPF on every endpoint veth, one transparent proxy) and
undoes everything at the end, also on Ctrl-C or SIGTERM; the parts get a `NodeRun`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

from demo import broker
from demo.procs import Children, uninterrupted
from demo.story import Story, run_cli
from l7proxy.agent.client import AgentError
from tests.agent_runner import AgentProcess, sweep_namespaces


@dataclass
class NodeRun:
    """The running agent, what the demo started next to it, and the endpoints' addresses."""

    agent: AgentProcess
    children: Children = field(default_factory=Children)
    ips: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict:
        return self.agent.env

    def netns(self, endpoint: str) -> str:
        return self.agent.prefix + endpoint

    def create_endpoints(self, story: Story, endpoints: dict[str, str]) -> None:
        """`endpoint create NAME --labels LABELS` for each; learns their IPs."""
        for name, labels in endpoints.items():
            run_cli(story, self.env, "endpoint", "create", name, "--labels", labels)
        listed = json.loads(self.agent.cli("endpoint", "list", "-o", "json").stdout)
        self.ips.update({ep["name"]: ep["ip"] for ep in listed})

    def map_url(self) -> str | None:
        """The dependency map on the agent's admin port; None when the agent cannot say."""
        try:
            admin = self.agent.client.call("status")["parts"]["admin"]["detail"]
        except (AgentError, OSError, KeyError, TypeError):
            return None
        return f"http://{admin}/map"


def _sweep_leftovers(story: Story, agent: AgentProcess) -> None:
    """An earlier run killed with SIGKILL cannot clean up: its namespaces, brokers, pins."""
    stale = sweep_namespaces(agent.prefix)
    stale += [f"broker pid {pid}" for pid in broker.sweep(agent.prefix)]
    if agent.pin_dir.exists():
        shutil.rmtree(agent.pin_dir, ignore_errors=True)
        stale.append(str(agent.pin_dir))
    if stale:
        story.say(f"removed leftovers of an earlier run: {', '.join(stale)}")


@contextlib.contextmanager
def session(story: Story, pool: str, prefix: str, keep: bool) -> Iterator[NodeRun]:
    """The agent for the whole node-mode run. On the way out (also on Ctrl-C/SIGTERM) the
    demo's processes stop and the agent removes endpoints, namespaces and pins, unless `keep`."""
    story.step("Start the agent (node mode: BPF on every endpoint veth, one transparent proxy)")
    run = NodeRun(AgentProcess(pool=pool, prefix=prefix, bpf=True))
    _sweep_leftovers(story, run.agent)
    story.command(["l7proxy", "agent", "--mode", "node", "--pool", pool, "--netns-prefix", prefix])
    kept = False
    try:
        run.agent.start()
        run_cli(story, run.env, "status")
        yield run
        if keep:
            story.say(f"--keep: leaving agent pid {run.agent.proc.pid} and {prefix}* namespaces up")
            story.say(f"its dependency map: {run.map_url()}")
            run.children.forget()
            kept = True
    finally:
        run.children.close()
        if story.failures:
            story.step("Something was unexpected: the agent's log ends with")
            print("\n".join(run.agent.log().splitlines()[-25:]))
        if not kept:
            story.step("Clean up: endpoints, namespaces, pinned maps, the agent")
            with uninterrupted():
                run.agent.close()
            story.say("done")
