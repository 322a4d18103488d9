"""`l7proxy agent --mode sidecar`: per-endpoint sidecar listeners fed by cgroup connect()
redirection, through the CLI (`endpoint exec` puts a command in the endpoint's cgroup)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(120)]

EGRESS_L7 = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client-egress}
    spec:
      endpointSelector: {matchLabels: {app: client}}
      egress:
        - toEndpoints:
            - matchLabels: {app: web}
          toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http:
                  - method: GET
                    path: /public/.*
    """
)


def ok(a: AgentProcess, *args: str) -> str:
    r = a.cli(*args)
    assert r.returncode == 0, f"l7proxy {' '.join(args)} failed: {r.stderr}\n{a.log()}"
    return r.stdout


def test_sidecar_mode_enforces_egress_l7_for_an_unmodified_curl(tmp_path):
    policy = tmp_path / "egress.yaml"
    policy.write_text(EGRESS_L7)
    agent = AgentProcess(pool=free_pool(), bpf=True, mode="sidecar")
    agent.start()
    server = None
    try:
        ok(agent, "endpoint", "create", "web", "--labels", "app=web")
        ok(agent, "endpoint", "create", "client", "--labels", "app=client")
        eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        assert Path(eps["client"]["cgroup"]).is_dir()
        status = json.loads(ok(agent, "status", "-o", "json"))
        assert (
            status["mode"] == "sidecar" and "sidecars client:" in status["parts"]["proxy"]["detail"]
        )
        web = eps["web"]["ip"]
        server = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "web", sys.executable, "-m", "demo.deathstar",
             web],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert server.stdout.readline().strip() == "listening"
        ok(agent, "policy", "import", str(policy))

        def code(path: str, *, in_cgroup: bool = True) -> str:
            curl = [
                "curl",
                "-s",
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                f"http://{web}{path}",
            ]
            if in_cgroup:
                return ok(agent, "endpoint", "exec", "client", "--", *curl)
            r = subprocess.run(
                ["ip", "netns", "exec", agent.prefix + "client", *curl],
                capture_output=True,
                text=True,
            )
            return r.stdout

        assert code("/public/plans") == "200"
        assert code("/private/plans") == "403"
        detail = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]["detail"]
        assert "(2 conns)" in detail and "0 node-proxy connections" in detail, detail
        # Outside the cgroup, tc redirects the same flow to the node proxy: same verdicts.
        assert code("/private/plans", in_cgroup=False) == "403"
        assert code("/public/plans", in_cgroup=False) == "200"
        time.sleep(0.3)
        flows = [
            json.loads(x)
            for x in ok(
                agent, "observe", "--protocol", "http", "-o", "json", "--last", "20"
            ).splitlines()
        ]
        denied = [f for f in flows if f["verdict"] == "DROPPED"]
        assert len(denied) == 2 and all(f["traffic_direction"] == "EGRESS" for f in denied)
        assert all(f["source"]["identity"] == eps["client"]["identity"] for f in denied)
        detail = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]["detail"]
        assert "(2 conns)" in detail and "2 node-proxy connections" in detail, detail
    finally:
        if server is not None:
            server.kill()
            server.wait()
        agent.close()
    assert not Path(eps["client"]["cgroup"]).exists()
