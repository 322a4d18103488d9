"""The DNS e2e lab the DNS tests and bench share: an agent, an outside namespace with its DNS
server (an `Outside` of test_agent_dns.py or a subclass), client endpoints labelled app=client,
and a policy whose `{dns}` is that server's address."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.agent_runner import AgentProcess
from tests.e2e.test_agent_dns import Outside, ok


@contextmanager
def dns_lab(
    agent: AgentProcess,
    outside_cls: type[Outside],
    policy: str,
    *,
    pods: tuple[str, ...] = ("client",),
    dns_host: int = 53,
) -> Iterator[Outside]:
    """Start `agent`, build the outside namespace, create `pods` and import `policy`; yields the
    outside namespace, and takes it and the agent down again."""
    agent.start()
    outside = None
    try:
        outside = outside_cls(agent.prefix)
        for pod in pods:
            ok(agent, "endpoint", "create", pod, "--labels", "app=client")
        path = Path(agent.state_dir) / "fqdn.yaml"
        path.write_text(policy.format(dns=outside.addr(dns_host)))
        ok(agent, "policy", "import", str(path))
        yield outside
    finally:
        if outside is not None:
            outside.close()
        agent.close()
