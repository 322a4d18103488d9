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
    dns_host: int | str = 53,
) -> Iterator[Outside]:
    """Start `agent`, build the outside namespace, create `pods` and import `policy` (its `{dns}`
    the server at `dns_host`); yields the outside namespace, and takes it and the agent down
    again."""
    agent.start()
    outside = None
    try:
        outside = outside_cls(agent.prefix)
        for pod in pods:
            ok(agent, "endpoint", "create", pod, "--labels", "app=client")
        path = Path(agent.state_dir) / "fqdn.yaml"
        # an int: the server's IPv4 host number; a str: its IPv6 one (Outside6, addr6)
        dns = outside.addr(dns_host) if isinstance(dns_host, int) else outside.addr6(dns_host)
        path.write_text(policy.format(dns=dns))
        ok(agent, "policy", "import", str(path))
        yield outside
    finally:
        if outside is not None:
            outside.close()
        agent.close()
