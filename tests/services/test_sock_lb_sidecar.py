"""Sidecar mode and services (issue 16): the VIP is translated before the sidecar's own connect4
program runs, so the sidecar's policy check sees the backend and its L7 rule applies. The
sidecar's programs sit on each endpoint's (child) cgroup, the socket LB on their parent; a
child's programs run first unless the parent's are attached with BPF_F_PREORDER."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from l7proxy.agent import netdev
from tests.agent_runner import AgentProcess, client_egress_l7, free_pool, ok
from tests.services.conftest import attached_programs

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(180)]

VIP = "10.96.16.30"
EGRESS_L7 = client_egress_l7(8080)


def test_sidecar_l7_rules_see_the_backend_behind_a_vip(tmp_path):
    # the parent of every endpoint cgroup: the agent attaches the socket LB there
    netdev.AGENT_CGROUPS.mkdir(parents=True, exist_ok=True)
    agent = AgentProcess(
        pool=free_pool(),
        bpf=True,
        mode="sidecar",
        extra_args=("--sock-lb-cgroup", str(netdev.AGENT_CGROUPS)),
    )
    agent.start()
    server = None
    try:
        status = json.loads(ok(agent, "status", "-o", "json"))
        assert "(preorder)" in status["parts"]["services"]["detail"], status["parts"]["services"]
        ok(agent, "endpoint", "create", "web", "--labels", "app=web")
        ok(agent, "endpoint", "create", "client", "--labels", "app=client")
        eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        web = eps["web"]["ip"]
        server = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "web", sys.executable, "-m",
             "tests.services.backend_server", "web", web],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert server.stdout.readline().strip() == "listening"
        ok(agent, "service", "create", "web", "--vip", f"{VIP}:80/TCP", "--selector", "app=web",
           "--target-port", "8080")  # fmt: skip
        policy = tmp_path / "egress.yaml"
        policy.write_text(EGRESS_L7)
        ok(agent, "policy", "import", str(policy))

        def client(path: str) -> list[dict]:
            out = ok(agent, "endpoint", "exec", "client", "--", sys.executable, "-m",
                     "tests.services.client", "tcp", VIP, "80", "3", path)  # fmt: skip
            return [json.loads(line) for line in out.splitlines()]

        public = client("/public/a")
        assert [(r["status"], r["backend"]) for r in public] == [(200, "web")] * 3, public
        # the sidecar judged web:8080 (its L7 rule answered), not the VIP (unknown, world)
        assert [r["status"] for r in client("/private")] == [403] * 3
    finally:
        if server is not None:
            server.kill()
            server.wait()
        agent.close()  # its pins go, the LB's links with them: detached from the shared parent
    assert not any(p.name.startswith("sock_lb") for p in attached_programs(netdev.AGENT_CGROUPS)), (
        "the socket LB stayed attached after its pins were removed"
    )
