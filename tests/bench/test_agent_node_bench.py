"""Node mode through the agent: what the kernel redirect and the node proxy cost.

One client endpoint runs `wrk -t1 -c50 -d5s` against nginx in another endpoint, keep-alive
GET /public/index.html, four ways in one run: BPF attached with no policy, an L3/L4 policy (BPF
only), an L7 policy through the inline node proxy, and through the proxy worker process. Prints
the table with each row's ratio to the BPF-only row. Noisy on a shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool
from tests.conftest import need_binary

pytestmark = [pytest.mark.bench, pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(300)]

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts:
        - ports: [{port: "80", protocol: TCP}]
"""
L7_RULES = '          rules: {http: [{method: GET, path: "/public/.*"}]}\n'


def _wrk(agent: AgentProcess, url: str) -> tuple[float, int]:
    r = subprocess.run(
        ["ip", "netns", "exec", agent.prefix + "client", need_binary("wrk"), "-t1", "-c50",
         "-d5s", url],
        capture_output=True,
        text=True,
    )  # fmt: skip
    rps = re.search(r"Requests/sec:\s+([\d.]+)", r.stdout)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", r.stdout)
    return (float(rps.group(1)) if rps else 0.0), int(errors.group(1)) if errors else 0


def _run(worker: str, tmp: Path) -> dict[str, tuple[float, int]]:
    agent = AgentProcess(pool=free_pool(), bpf=True, extra_args=("--proxy-worker", worker))
    agent.start()
    nginx = None
    rows = {}
    try:
        agent.cli("endpoint", "create", "web", "--labels", "app=web", check=True)
        agent.cli("endpoint", "create", "client", "--labels", "app=client", check=True)
        ips = {
            e["name"]: e["ip"]
            for e in json.loads(agent.cli("endpoint", "list", "-o", "json").stdout)
        }
        root = tmp / worker
        (root / "public").mkdir(parents=True)
        (root / "public" / "index.html").write_text("hello\n" * 10)
        for path in (tmp, root, root / "public"):
            path.chmod(0o755)  # nginx's worker runs as nobody
        conf = root / "nginx.conf"
        conf.write_text(
            f"worker_processes 1; pid {root}/nginx.pid; error_log {root}/err.log; daemon off;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ access_log off; keepalive_requests 1000000; "
            f"server {{ listen {ips['web']}:80; root {root}; }} }}\n"
        )
        nginx = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "web", need_binary("nginx"), "-c", str(conf)],
            start_new_session=True,  # its workers go with the group
        )
        time.sleep(1)
        url = f"http://{ips['web']}/public/index.html"
        if worker == "inline":
            rows["BPF attached, no policy"] = _wrk(agent, url)
            (tmp / "l4.yaml").write_text(POLICY)
            agent.cli("policy", "import", str(tmp / "l4.yaml"), check=True)
            rows["L3/L4 policy (BPF only)"] = _wrk(agent, url)
        (tmp / "l7.yaml").write_text(POLICY + L7_RULES)
        agent.cli("policy", "import", str(tmp / "l7.yaml"), check=True)
        time.sleep(1)
        rows[f"L7 policy, node proxy ({worker})"] = _wrk(agent, url)
    finally:
        if nginx is not None:
            os.killpg(nginx.pid, 9)
        agent.close()
    return rows


def test_node_mode_throughput_through_bpf_and_the_node_proxy():
    with tempfile.TemporaryDirectory() as tmp:
        rows = _run("inline", Path(tmp)) | _run("process", Path(tmp))
    base = rows["L3/L4 policy (BPF only)"][0]
    print("\nnode mode, wrk -t1 -c50 -d5s, keep-alive GET /public/index.html")
    for name, (rps, errors) in rows.items():
        print(f"  {name:36s} {rps:10.0f} req/s  {rps / base:5.2f}x BPF only  non-2xx {errors}")
    assert all(rps > 0 and errors == 0 for rps, errors in rows.values()), rows
