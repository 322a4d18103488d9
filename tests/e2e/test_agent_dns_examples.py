"""Cilium's toFQDNs/dns example policies, imported verbatim from ../shared and enforced in the
kernel (root, BPF): a kube-dns endpoint in kube-system runs dnsmasq, the pods resolve through it,
and the names' addresses live in an outside namespace (the world) with an HTTP server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool
from tests.e2e.test_agent_dns import Outside, ok
from tests.shared import CILIUM_EXAMPLES

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(180)]

EXAMPLES = CILIUM_EXAMPLES
DNS_EXAMPLE = EXAMPLES / "examples__policies__l7__dns__dns.yaml"
FQDN_EXAMPLE = EXAMPLES / "examples__policies__l3__fqdn__fqdn.yaml"


@pytest.fixture(scope="module")
def cluster():
    if not DNS_EXAMPLE.exists():
        pytest.skip("../shared is not present (it is in CI)")
    agent = AgentProcess(pool=free_pool(), bpf=True)
    agent.start()
    outside, dnsmasq = None, None
    netns_dirs = []
    try:
        outside = Outside(agent.prefix)
        a = outside.addr
        ok(agent, "endpoint", "create", "kube-dns",
           "--labels", "k8s:io.kubernetes.pod.namespace=kube-system,k8s-app=kube-dns")  # fmt: skip
        ok(agent, "endpoint", "create", "alliance", "--labels", "org=alliance")
        ok(agent, "endpoint", "create", "test-app", "--labels", "app=test-app")
        eps = {e["name"]: e for e in agent.client.call("endpoint.list")}
        dns_ip = eps["kube-dns"]["ip"]
        records = {
            "cilium.io": 10, "sub.cilium.io": 11, "service1.api.cilium.io": 12,
            "special-x-service.api.cilium.io": 13, "other.cilium.io": 100,
            "my-remote-service.com": 101, "evil.io": 20,
        }  # fmt: skip
        dnsmasq = subprocess.Popen(
            ["ip", "netns", "exec", agent.prefix + "kube-dns", "dnsmasq", "--no-daemon",
             "--no-resolv", "--no-hosts", "--bind-interfaces", f"--listen-address={dns_ip}",
             "--port=53", "--pid-file=", "--user=root", "--log-facility=-", "--local=/io/",
             "--local=/com/",
             *(f"--host-record={n},{a(h)},300" for n, h in records.items())],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for ep in ("alliance", "test-app"):
            etc = Path("/etc/netns") / (agent.prefix + ep)
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(f"nameserver {dns_ip}\noptions attempts:2 timeout:1\n")
            netns_dirs.append(etc)
        ok(agent, "policy", "import", str(DNS_EXAMPLE), str(FQDN_EXAMPLE))
        yield agent, outside, dns_ip
    finally:
        for etc in netns_dirs:
            subprocess.run(["rm", "-rf", str(etc)], check=False)
        if dnsmasq is not None:
            dnsmasq.kill()
            dnsmasq.wait()
        if outside is not None:
            outside.close()
        agent.close()


def dig(agent, ep: str, server: str, name: str) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", agent.prefix + ep, "dig", f"@{server}", "+time=2", "+tries=1", name],
        capture_output=True, text=True,
    )  # fmt: skip
    return next(
        (ln.split("status: ")[1].split(",")[0] for ln in r.stdout.splitlines() if "status: " in ln),
        "timeout",
    )


def curl_in(agent, ep: str, url: str, timeout: float = 2) -> str:
    r = subprocess.run(
        ["ip", "netns", "exec", agent.prefix + ep, "curl", "-s", "-m", str(timeout), "-o",
         "/dev/null", "-w", "%{http_code}", url],
        capture_output=True, text=True,
    )  # fmt: skip
    return "timeout" if r.returncode == 28 else (r.stdout or f"rc={r.returncode}")


def test_dns_visibility_example_as_written(cluster):
    agent, outside, dns_ip = cluster
    assert dig(agent, "alliance", dns_ip, "cilium.io") == "NOERROR"
    assert dig(agent, "alliance", dns_ip, "x.api.cilium.io") == "NXDOMAIN"  # forwarded
    assert dig(agent, "alliance", dns_ip, "evil.io") == "REFUSED"
    assert dig(agent, "alliance", dns_ip, "a.b.cilium.io") == "REFUSED"  # * is one label
    for name in ("cilium.io", "sub.cilium.io", "service1.api.cilium.io",
                 "special-x-service.api.cilium.io"):  # fmt: skip
        assert curl_in(agent, "alliance", f"http://{name}/") == "200", name
    # resolvable through the dns rule, but no toFQDNs names it
    assert curl_in(agent, "alliance", "http://other.cilium.io/", timeout=1) == "timeout"
    # toFQDNs here is port 80 only
    assert curl_in(agent, "alliance", f"http://{outside.addr(10)}:7/", timeout=1) == "timeout"


def test_fqdn_example_as_written(cluster):
    agent, outside, dns_ip = cluster
    assert dig(agent, "test-app", dns_ip, "evil.io") == "NOERROR"  # matchPattern '*'
    assert curl_in(agent, "test-app", "http://my-remote-service.com/") == "200"
    # toFQDNs without toPorts: every port to the learned IP
    code = (
        "import socket; ip = socket.gethostbyname('my-remote-service.com'); "
        "c = socket.create_connection((ip, 7), timeout=2); c.sendall(b'x'); print(c.recv(1))"
    )
    r = subprocess.run(["ip", "netns", "exec", agent.prefix + "test-app", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=20)  # fmt: skip
    assert r.stdout.strip() == "b'x'", r.stderr
    # an address learned only for another name stays closed
    assert curl_in(agent, "test-app", "http://evil.io/", timeout=1) == "timeout"
