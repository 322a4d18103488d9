"""A dual-stack agent (--pool6) with the BPF datapath and the node proxy, through the CLI (issue
17): endpoints get both addresses, the kernel enforces L3/L4 over IPv6, and curl -6 through the
node proxy gets 403 / 200 as the L7 rule says, exactly as over IPv4."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, client_egress_l7, free_pool, free_pool6, ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parents[2]
L3L4 = str(REPO / "demo" / "sw_l3_l4_policy.yaml")
L7 = str(REPO / "demo" / "sw_l3_l4_l7_policy.yaml")

# The deathstar's routes on both families: POST /v1/request-landing and PUT /v1/exhaust-port.
SERVER = """
import socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class H(BaseHTTPRequestHandler):
    def _route(self):
        body = b"Ship landed\\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = _route
    def log_message(self, *a):
        pass

class S(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "deathstar", self.server_address[1]

s = S(("::", 80), H)
print("listening", flush=True)
s.serve_forever()
"""


@pytest.fixture
def dual():
    agent = AgentProcess(pool=free_pool(), bpf=True, extra_args=("--pool6", free_pool6()))
    agent.start()
    server = None
    try:
        for name, labels in (
            ("deathstar", "org=empire,class=deathstar"),
            ("tiefighter", "org=empire,class=tiefighter"),
            ("xwing", "org=alliance,class=xwing"),
        ):
            ok(agent, "endpoint", "create", name, "--labels", labels)
        server = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "deathstar", sys.executable, "-c", SERVER],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "listening"
        yield agent
    finally:
        if server is not None:
            server.kill()
            server.wait()
        agent.close()


def curl(agent: AgentProcess, ship: str, method: str, url: str, *flags: str) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", agent.prefix + ship, "curl", "-s", "-m", "1.5", *flags,
         "-X", method, "-o", "/dev/null", "-w", "%{http_code}", url],
        capture_output=True,
        text=True,
    )  # fmt: skip
    return "timeout" if r.returncode == 28 else r.stdout


def test_dual_stack_endpoints_l3_l4_and_l7_over_ipv6(dual):
    agent = dual
    eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
    star4, star6 = eps["deathstar"]["ip"], eps["deathstar"]["ip6"]
    assert ":" in star6 and star4.count(".") == 3
    status = json.loads(ok(agent, "status", "-o", "json"))
    assert status["pool6"] and status["router6"]
    url6, url4 = f"http://[{star6}]", f"http://{star4}"

    assert curl(agent, "xwing", "POST", url6 + "/v1/request-landing", "-6") == "200"
    ok(agent, "policy", "import", L3L4)
    for url in (url6, url4):
        assert curl(agent, "xwing", "POST", url + "/v1/request-landing") == "timeout", url
        assert curl(agent, "tiefighter", "POST", url + "/v1/request-landing") == "200", url
    ok(agent, "policy", "import", L7)
    for url in (url6, url4):
        assert curl(agent, "tiefighter", "PUT", url + "/v1/exhaust-port") == "403", url
        assert curl(agent, "tiefighter", "POST", url + "/v1/request-landing") == "200", url
        assert curl(agent, "xwing", "POST", url + "/v1/request-landing") == "timeout", url

    # The proxy's L7 verdicts and the kernel's drops name the IPv6 peers.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        flows = agent.client.call("observe", last=500)
        l7 = [
            f
            for f in flows
            if f["event_type"] == "L7" and f["source"]["ip"] == eps["tiefighter"]["ip6"]
        ]
        drops = [
            f
            for f in flows
            if f["event_type"] == "L3_L4"
            and f["verdict"] == "DROPPED"
            and f["source"]["ip"] == eps["xwing"]["ip6"]
        ]
        if l7 and drops:
            break
        time.sleep(0.2)
    assert any(f["verdict"] == "DROPPED" and f["l7"]["http"]["code"] == 403 for f in l7), l7
    assert drops[0]["destination"]["ip"] == star6
    assert drops[0]["source"]["identity"] == eps["xwing"]["identity"]


SIDECAR_EGRESS_L7 = client_egress_l7(80)


def test_sidecar_mode_redirects_curl_6_to_a_native_ipv6_destination(tmp_path):
    """connect6 sends the client's IPv6 connect() to its sidecar, which forwards to the original
    IPv6 destination: 200 / 403 as the rule says; outside the cgroup the node proxy does it."""
    policy = tmp_path / "egress.yaml"
    policy.write_text(SIDECAR_EGRESS_L7)
    agent = AgentProcess(
        pool=free_pool(), bpf=True, mode="sidecar", extra_args=("--pool6", free_pool6())
    )
    agent.start()
    server = None
    try:
        ok(agent, "endpoint", "create", "web", "--labels", "app=web")
        ok(agent, "endpoint", "create", "client", "--labels", "app=client")
        eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
        web6 = eps["web"]["ip6"]
        server = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "web", sys.executable, "-c", SERVER],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdout.readline().strip() == "listening"
        ok(agent, "policy", "import", str(policy))
        curl6 = ["curl", "-6", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}"]
        in_cgroup = ("endpoint", "exec", "client", "--", *curl6)
        assert ok(agent, *in_cgroup, f"http://[{web6}]/public/plans") == "200"
        assert ok(agent, *in_cgroup, f"http://[{web6}]/private/plans") == "403"
        detail = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]["detail"]
        assert "client:" in detail and "(2 conns)" in detail, detail
        outside = curl(agent, "client", "GET", f"http://[{web6}]/private/plans")
        assert outside == "403"  # tc's redirect to the node proxy, outside the cgroup
    finally:
        if server is not None:
            server.kill()
            server.wait()
        agent.close()


def test_an_ipv6_only_endpoint_gets_no_ipv4_and_is_enforced(dual):
    agent = dual
    out = ok(
        agent, "endpoint", "create", "scout", "--labels", "org=empire,class=scout", "--ipv6-only"
    )
    assert "ip6 " in out and " ip " not in out, out
    eps = {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}
    assert eps["scout"]["ip"] == "" and ":" in eps["scout"]["ip6"]
    inside = subprocess.run(
        ["ip", "netns", "exec", agent.prefix + "scout", "ip", "-4", "-o", "addr", "show", "eth0"],
        capture_output=True,
        text=True,
    )
    assert inside.stdout.strip() == ""  # no IPv4 address at all
    refused = agent.cli("endpoint", "create", "bad", "--labels", "a=b", "--ipv6-only", "--ip",
                        "10.1.2.3")  # fmt: skip
    assert refused.returncode != 0 and "contradict" in refused.stderr
    url6 = f"http://[{eps['deathstar']['ip6']}]"
    ok(agent, "policy", "import", L7)
    assert curl(agent, "scout", "PUT", url6 + "/v1/exhaust-port") == "403"
    assert curl(agent, "scout", "POST", url6 + "/v1/request-landing") == "200"
    ok(agent, "endpoint", "delete", "scout")
    assert "scout" not in ok(agent, "endpoint", "list")
