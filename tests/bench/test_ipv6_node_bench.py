"""HTTP/1 through the node proxy over IPv6 against IPv4 (issue 17), one dual-stack agent, one
run: `wrk -t1 -c50 -d5s` keep-alive GET /public/index.html from a client endpoint to nginx in
another endpoint under an L7 policy, the two families interleaved twice, best of each.
Target: IPv6 >= 0.95x IPv4. Prints the numbers and met/MISSED; asserts only that traffic flowed
without errors."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool
from tests.bench.test_agent_node_bench import L7_RULES, POLICY, _wrk
from tests.conftest import need_binary
from tests.e2e.test_agent_ipv6 import free_pool6

pytestmark = [pytest.mark.bench, pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(300)]


def test_node_proxy_http1_over_ipv6_vs_ipv4():
    agent = AgentProcess(pool=free_pool(), bpf=True, extra_args=("--pool6", free_pool6()))
    agent.start()
    nginx = None
    try:
        agent.cli("endpoint", "create", "web", "--labels", "app=web", check=True)
        agent.cli("endpoint", "create", "client", "--labels", "app=client", check=True)
        eps = {e["name"]: e for e in json.loads(agent.cli("endpoint", "list", "-o", "json").stdout)}
        web4, web6 = eps["web"]["ip"], eps["web"]["ip6"]
        tmp = Path(tempfile.mkdtemp(prefix="l7bench-v6-"))
        (tmp / "public").mkdir()
        (tmp / "public" / "index.html").write_text("hello\n" * 10)
        for path in (tmp, tmp / "public"):
            path.chmod(0o755)  # nginx's worker runs as nobody
        conf = tmp / "nginx.conf"
        conf.write_text(
            f"worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/err.log; daemon off;\n"
            "events { worker_connections 4096; }\n"
            f"http {{ access_log off; keepalive_requests 1000000; server {{ listen {web4}:80; "
            f"listen [{web6}]:80; root {tmp}; }} }}\n"
        )
        nginx = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "web", need_binary("nginx"), "-c", str(conf)],
            start_new_session=True,
        )
        (tmp / "l7.yaml").write_text(POLICY + L7_RULES)
        agent.cli("policy", "import", str(tmp / "l7.yaml"), check=True)
        time.sleep(1)
        runs: dict[str, list[tuple[float, int]]] = {"IPv4": [], "IPv6": []}
        for _ in range(2):
            runs["IPv4"].append(_wrk(agent, f"http://{web4}/public/index.html"))
            runs["IPv6"].append(_wrk(agent, f"http://[{web6}]/public/index.html"))
    finally:
        if nginx is not None:
            os.killpg(nginx.pid, 9)
        agent.close()
    best = {family: max(rps for rps, _ in r) for family, r in runs.items()}
    ratio = best["IPv6"] / best["IPv4"]
    print(
        f"\nnode proxy, wrk -t1 -c50 -d5s, L7 policy: IPv4 {best['IPv4']:.0f} req/s, "
        f"IPv6 {best['IPv6']:.0f} req/s, ratio {ratio:.3f} "
        f"({'met' if ratio >= 0.95 else 'MISSED'} >= 0.95; runs {runs})",
        flush=True,
    )
    assert all(rps > 0 and errors == 0 for r in runs.values() for rps, errors in r), runs
