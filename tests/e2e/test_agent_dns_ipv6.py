"""DNS policy over IPv6 end to end (issues 21 and 17; root, real kernel, real dnsmasq, real
clients): a dual-stack agent (--pool6) in node and in sidecar mode, a pod with an IPv6 address,
and the outside namespace of test_agent_dns.py with an IPv6 prefix and a second dnsmasq on its
IPv6 address.

The tc program hands IPv6 DNS to the DNS proxy's [::1] sockets (UDP and TCP): allowed names are
forwarded over IPv6 to the server the pod asked, others answered REFUSED, and the AAAA answer's
addresses are learned for toFQDNs before the answer goes back, so the pod's first IPv6 connect
to them passes and an address DNS never returned stays closed."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool
from tests.e2e.dns_lab import dns_lab
from tests.e2e.test_agent_dns import Outside, in_pod, ok, sh
from tests.e2e.test_agent_ipv6 import free_pool6

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(120)]

POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fqdn-egress-v6}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDR: [{dns}/128]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*.example.com"}}]
  - toFQDNs: [{{matchName: six.example.com}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
"""
SERVE6 = textwrap.dedent(
    """
    import http.server, socket, socketserver
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"six"
            self.send_response(200); self.send_header("Content-Length", "3")
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        address_family = socket.AF_INET6
        daemon_threads = True
        def server_bind(self):  # beside the IPv4 server on 0.0.0.0:80
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            super().server_bind()
    S(("::", 80), H).serve_forever()
    """
)


class Outside6(Outside):
    """The e2e lab's outside namespace plus fd00:53:N::/64: dnsmasq on ::53 with six.example.com
    (AAAA ::10, also answers for the names on IPv4), an HTTP server on [::]:80, and ::20, an
    address no answer ever names."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.run("ip", "-6", "addr", "add", f"{self.addr6('254')}/64", "dev", "w1", "nodad")
        sh("ip", "-6", "addr", "add", f"{self.addr6('1')}/64", "dev", self.host_if, "nodad")
        for host in ("53", "10", "20"):
            self.run("ip", "-6", "addr", "add", f"{self.addr6(host)}/64", "dev", "w1", "nodad")
        self.run("ip", "-6", "route", "add", "default", "via", self.addr6("1"))
        self.spawn(
            "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
            f"--listen-address={self.addr6('53')}", "--except-interface=lo", "--port=53",
            "--pid-file=", "--user=root", f"--host-record=six.example.com,{self.addr6('10')},300",
            f"--host-record=evil.test,{self.addr6('20')},300",
        )  # fmt: skip
        self.spawn(sys.executable, "-c", SERVE6)
        deadline = time.monotonic() + 10
        while sh("dig", "-6", f"@{self.addr6('53')}", "+short", "+time=1", "+tries=1", "AAAA",
                 "six.example.com", check=False).stdout.strip() != self.addr6("10"):  # fmt: skip
            assert time.monotonic() < deadline, "dnsmasq did not answer on IPv6"
            time.sleep(0.1)

    def addr6(self, host: str) -> str:
        return f"fd00:53:{self.net}::{host}"


@pytest.fixture(scope="module", params=["node", "sidecar"])
def lab6(request):
    assert shutil.which("dnsmasq") and shutil.which("dig"), "make setup installs dnsmasq and dig"
    agent = AgentProcess(
        pool=free_pool(), bpf=True, mode=request.param, extra_args=("--pool6", free_pool6())
    )
    with dns_lab(agent, Outside6, POLICY, dns_host="53") as outside:
        etc = Path("/etc/netns") / (agent.prefix + "client")
        try:
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(
                f"nameserver {outside.addr6('53')}\noptions attempts:1\n"
            )
            yield agent, outside
        finally:
            shutil.rmtree(etc, ignore_errors=True)


def dig6(agent, outside, name: str, *extra: str) -> tuple[str, list[str]]:
    r = in_pod(agent, "dig", "-6", f"@{outside.addr6('53')}", "+time=2", "+tries=1", "AAAA",
               name, *extra)  # fmt: skip
    status = next((ln.split("status: ")[1].split(",")[0] for ln in r.stdout.splitlines()
                   if "status: " in ln), "timeout")  # fmt: skip
    return status, [ln.split()[-1] for ln in r.stdout.splitlines() if "\tIN\tAAAA\t" in ln]


def curl6(agent, url: str, timeout: float = 2) -> str:
    r = in_pod(agent, "curl", "-6", "-g", "-s", "-m", str(timeout), "-o", "/dev/null", "-w",
               "%{http_code}", url)  # fmt: skip
    return "timeout" if r.returncode == 28 else (r.stdout or f"rc={r.returncode}")


def test_ipv6_dns_is_forwarded_or_refused_over_udp_and_tcp(lab6):
    agent, outside = lab6
    assert dig6(agent, outside, "six.example.com") == ("NOERROR", [outside.addr6("10")])
    assert dig6(agent, outside, "six.example.com", "+tcp") == ("NOERROR", [outside.addr6("10")])
    assert dig6(agent, outside, "evil.test")[0] == "REFUSED"
    assert dig6(agent, outside, "evil.test", "+tcp")[0] == "REFUSED"
    status = json.loads(ok(agent, "status", "-o", "json"))["parts"]["fqdn"]["detail"]
    assert "[::1]:" in status, status


def test_aaaa_answers_are_learned_for_the_first_ipv6_connect(lab6):
    agent, outside = lab6
    # an address DNS never returned (evil.test is refused, so it is never learned): dropped
    assert curl6(agent, f"http://[{outside.addr6('20')}]/", timeout=1) == "timeout"
    assert dig6(agent, outside, "evil.test")[0] == "REFUSED"
    assert curl6(agent, f"http://[{outside.addr6('20')}]/", timeout=1) == "timeout"
    # glibc resolves over IPv6 (resolv.conf) and curl connects at once: the first SYN passes
    assert curl6(agent, "http://six.example.com/") == "200"
    # Python's resolver, then connect, in the pod
    code = (
        "import socket; a = socket.getaddrinfo('six.example.com', 80, socket.AF_INET6)[0][4]; "
        "s = socket.create_connection(a[:2], timeout=2); print('ok', a[0])"
    )
    r = in_pod(agent, sys.executable, "-c", code)
    assert r.stdout.strip() == f"ok {outside.addr6('10')}", r.stderr
    flows = [
        json.loads(ln) for ln in ok(agent, "observe", "--last", "500", "-o", "json").splitlines()
    ]
    answers = [
        f
        for f in flows
        if f.get("l7", {}).get("type") == "RESPONSE"
        and f["l7"].get("dns", {}).get("query") == "six.example.com."
    ]
    assert answers and answers[-1]["l7"]["dns"]["ips"] == [outside.addr6("10")]
    assert answers[-1]["destination"]["ip"] == outside.addr6("53")
