"""DNS policy end to end (root, real kernel, real dnsmasq, real clients): an agent with the BPF
datapath, a pod endpoint, and an "outside" namespace (not managed by the agent: the world) with
dnsmasq serving a test zone and an HTTP server on several addresses.

rules.dns forwards allowed names and answers the rest REFUSED (UDP and TCP); toFQDNs lets the pod
connect to the IPs its allowed answers returned, on the first SYN, and to nothing else; TTL expiry
stops new connections but not open ones; learned IPs survive an agent restart."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(240)]

SERVE = textwrap.dedent(
    """
    import http.server, socketserver
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = self.server.server_address[0].encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True
        request_queue_size = 1024  # a full accept queue drops SYNs: not what is measured
    S(("0.0.0.0", 80), H).serve_forever()
    """
)
ECHO = textwrap.dedent(
    """
    import socket, threading
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7)); s.listen(16)
    def echo(c):
        while (d := c.recv(100)):
            c.sendall(d)
    while True:
        c, _ = s.accept(); threading.Thread(target=echo, args=(c,), daemon=True).start()
    """
)


def sh(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, **kw)


class Outside:
    """198.18.N.0/24 behind a veth from the host: dnsmasq on .53, HTTP on :80 and echo on :7."""

    def __init__(self, prefix: str) -> None:
        self.net = random.randint(100, 199)
        self.ns = prefix + "world"
        self.host_if = prefix[:8] + "w0"
        self.procs: list[subprocess.Popen] = []
        a = self.addr
        sh("ip", "netns", "add", self.ns)
        sh(
            "ip",
            "link",
            "add",
            self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            "w1",
            "netns",
            self.ns,
        )
        sh("ip", "addr", "add", f"{a(254)}/24", "dev", self.host_if)
        sh("ip", "link", "set", self.host_if, "up")
        self.run("ip", "link", "set", "lo", "up")
        self.run("ip", "link", "set", "w1", "up")
        for host in (53, 10, 11, 12, 13, 20, *range(100, 200)):
            self.run("ip", "addr", "add", f"{a(host)}/24", "dev", "w1")
        self.run("ip", "route", "add", "default", "via", a(254))
        records = [
            f"--host-record=api.example.com,{a(10)},300",
            f"--host-record=short.example.com,{a(11)},2",
            f"--host-record=edge.example.net,{a(12)},300",
            "--cname=www.example.com,edge.example.net",
            f"--host-record=v6.example.com,{a(13)},2001:db8::13,300",
            f"--host-record=evil.test,{a(20)},300",
            *(f"--host-record=r{i}.s3.example.com,{a(100 + i)},300" for i in range(100)),
        ]
        self.spawn(
            "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
            f"--listen-address={a(53)}", "--except-interface=lo", "--port=53", "--log-facility=-",
            "--pid-file=", "--user=root", *records,
        )  # fmt: skip
        self.spawn(sys.executable, "-c", SERVE)
        self.spawn(sys.executable, "-c", ECHO)
        deadline = time.monotonic() + 10
        while sh("dig", f"@{a(53)}", "+short", "+time=1", "+tries=1", "api.example.com",
                 check=False).stdout.strip() != a(10):  # fmt: skip
            assert time.monotonic() < deadline, "dnsmasq did not answer"
            time.sleep(0.1)

    def addr(self, host: int) -> str:
        return f"198.18.{self.net}.{host}"

    def run(self, *args: str) -> None:
        sh("ip", "netns", "exec", self.ns, *args)

    def spawn(self, *args: str) -> None:
        self.procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *args],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    def close(self) -> None:
        for p in self.procs:
            p.kill()
            p.wait()
        sh("ip", "link", "del", self.host_if, check=False)
        sh("ip", "netns", "del", self.ns, check=False)


POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fqdn-egress}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDR: [{dns}/32]
    toPorts:
    - ports: [{{port: "53", protocol: ANY}}]
      rules:
        dns: [{{matchPattern: "*.example.com"}}, {{matchPattern: "*.s3.example.com"}}]
  - toFQDNs: [{{matchName: api.example.com}}, {{matchName: www.example.com}},
              {{matchPattern: "*.s3.example.com"}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
  - toFQDNs: [{{matchName: short.example.com}}]
    toPorts:
    - ports: [{{port: "7", protocol: TCP}}]
"""


@pytest.fixture(scope="module", params=["node", "sidecar"])
def lab(request, tmp_path_factory):
    assert shutil.which("dnsmasq") and shutil.which("dig"), "make setup installs dnsmasq and dig"
    agent = AgentProcess(pool=free_pool(), bpf=True, mode=request.param)
    agent.start()
    outside = None
    etc = None
    try:
        outside = Outside(agent.prefix)
        ok(agent, "endpoint", "create", "client", "--labels", "app=client")
        policy = tmp_path_factory.mktemp("dns") / "fqdn.yaml"
        policy.write_text(POLICY.format(dns=outside.addr(53)))
        ok(agent, "policy", "import", str(policy))
        # `ip netns exec` mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf
        etc = Path("/etc/netns") / (agent.prefix + "client")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {outside.addr(53)}\noptions attempts:1\n")
        yield agent, outside
    finally:
        if etc is not None:
            shutil.rmtree(etc, ignore_errors=True)
        if outside is not None:
            outside.close()
        agent.close()


def ok(a: AgentProcess, *args: str) -> str:
    r = a.cli(*args)
    assert r.returncode == 0, f"l7proxy {' '.join(args)} failed: {r.stderr}\n{a.log()}"
    return r.stdout


def in_pod(agent, *args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return sh("ip", "netns", "exec", agent.prefix + "client", *args, check=False, timeout=timeout)


def dig(agent, outside, name: str, *extra: str) -> tuple[str, list[str]]:
    r = in_pod(agent, "dig", f"@{outside.addr(53)}", "+time=2", "+tries=1", name, *extra)
    status = next((ln.split("status: ")[1].split(",")[0] for ln in r.stdout.splitlines()
                   if "status: " in ln), "timeout")  # fmt: skip
    answers = [ln.split()[-1] for ln in r.stdout.splitlines() if "\tIN\tA\t" in ln]
    return status, answers


def curl(agent, url: str, timeout: float = 2) -> str:
    r = in_pod(
        agent, "curl", "-s", "-m", str(timeout), "-o", "/dev/null", "-w", "%{http_code}", url
    )
    return "timeout" if r.returncode == 28 else (r.stdout or f"rc={r.returncode}")


def test_allowed_names_are_forwarded_and_others_refused(lab):
    agent, outside = lab
    assert dig(agent, outside, "api.example.com") == ("NOERROR", [outside.addr(10)])
    assert dig(agent, outside, "evil.test")[0] == "REFUSED"
    assert dig(agent, outside, "example.com")[0] == "REFUSED"  # *.example.com needs a label
    # TCP too (the rule's port is ANY), through the transparent TCP listener
    assert dig(agent, outside, "api.example.com", "+tcp") == ("NOERROR", [outside.addr(10)])
    assert dig(agent, outside, "evil.test", "+tcp")[0] == "REFUSED"
    # a CNAME chain to an allowed name: the answer carries the target's IP
    status, ips = dig(agent, outside, "www.example.com")
    assert status == "NOERROR" and outside.addr(12) in ips


def test_first_connect_to_a_learned_ip_passes_and_others_drop(lab):
    agent, outside = lab
    # curl resolves through the glibc resolver (resolv.conf) and connects at once: first SYN
    assert curl(agent, "http://api.example.com/") == "200"
    assert curl(agent, "http://www.example.com/") == "200"  # learned via the CNAME chain
    # an IP DNS never returned, and one returned only for a refused name
    assert curl(agent, f"http://{outside.addr(20)}/", timeout=1) == "timeout"
    assert dig(agent, outside, "evil.test")[0] == "REFUSED"
    assert curl(agent, f"http://{outside.addr(20)}/", timeout=1) == "timeout"
    # the learned IP only on the rule's port
    assert curl(agent, f"http://{outside.addr(10)}:7/", timeout=1) == "timeout"
    # Python's resolver (getaddrinfo) then connect, from inside the pod
    code = (
        "import socket; a = socket.getaddrinfo('r7.s3.example.com', 80)[0][4]; "
        "s = socket.create_connection(a, timeout=2); print('ok', a[0])"
    )
    r = in_pod(agent, sys.executable, "-c", code)
    assert r.stdout.strip() == f"ok {outside.addr(107)}", r.stderr


def test_many_names_each_first_connect_passes_and_the_map_is_bounded(lab):
    agent, outside = lab
    code = textwrap.dedent(
        """
        import socket, sys
        bad = []
        for i in range(100):
            ip = socket.gethostbyname(f"r{i}.s3.example.com")
            try:
                socket.create_connection((ip, 80), timeout=1).close()
            except OSError as exc:
                bad.append((i, ip, str(exc)))
        print(len(bad), bad[:3])
        """
    )
    r = in_pod(agent, sys.executable, "-c", code, timeout=120)
    assert r.stdout.startswith("0 "), r.stdout + r.stderr
    status = json.loads(ok(agent, "status", "-o", "json"))
    assert "fqdn" in status["parts"], status["parts"]
    # one identity for every IP the *.s3 selector selects: the maps grow by ipcache entries only
    learned = status["parts"]["fqdn"]
    assert learned["identities"] <= 4 and learned["ips"] <= 110, learned


def test_ttl_expiry_stops_new_connections_but_not_open_ones(lab):
    agent, outside = lab
    code = textwrap.dedent(
        """
        import socket, time
        ip = socket.gethostbyname("short.example.com")  # TTL 2 s
        c = socket.create_connection((ip, 7), timeout=2)
        c.sendall(b"a"); assert c.recv(1) == b"a"
        time.sleep(5)  # the TTL ran out; the open connection keeps the IP allowed
        try:
            socket.create_connection((ip, 7), timeout=1).close()
            print("new: ok", end=" ")
        except OSError:
            print("new: dropped", end=" ")
        c.sendall(b"b"); print("old:", c.recv(1).decode(), end=" ")
        c.close()
        time.sleep(4)
        try:
            socket.create_connection((ip, 7), timeout=1).close()
            print("after: ok")
        except OSError:
            print("after: dropped")
        """
    )
    # with an open connection the IP stays (conntrack keeps it); a new one passes then too
    r = in_pod(agent, sys.executable, "-c", code, timeout=60)
    assert "old: b" in r.stdout, r.stdout + r.stderr
    assert r.stdout.strip().endswith("after: dropped"), r.stdout + r.stderr


def test_dns_flows_and_metrics(lab):
    agent, outside = lab
    dig(agent, outside, "api.example.com")
    dig(agent, outside, "evil.test")
    # garbage to the DNS port: dropped with a flow, and the proxy keeps answering
    garbage = (
        "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
        f"s.sendto(b'\\x00\\x01garbage', ('{outside.addr(53)}', 53))"
    )
    assert in_pod(agent, sys.executable, "-c", garbage).returncode == 0
    time.sleep(0.3)
    assert dig(agent, outside, "api.example.com") == ("NOERROR", [outside.addr(10)])
    flows = [
        json.loads(ln) for ln in ok(agent, "observe", "--last", "2000", "-o", "json").splitlines()
    ]
    dns = [f for f in flows if "dns" in f.get("l7", {})]
    refused = [
        f for f in dns if f["l7"]["dns"].get("query") == "evil.test." and f["verdict"] == "DROPPED"
    ]
    assert refused and refused[-1]["l7"]["dns"]["rcode"] == 5
    answers = [
        f
        for f in dns
        if f["l7"]["type"] == "RESPONSE" and f["l7"]["dns"].get("query") == "api.example.com."
    ]
    assert answers and answers[-1]["l7"]["dns"]["ips"] == [outside.addr(10)]
    assert answers[-1]["l7"]["dns"]["ttl"] > 0 and answers[-1]["source"]["pod_name"] == "client"
    metrics = ok(agent, "metrics")
    assert "dns_refused_total" in metrics and 'dns_responses_total{rcode="NOERROR"}' in metrics


def test_learned_ips_survive_an_agent_restart(lab):
    agent, outside = lab
    assert curl(agent, "http://api.example.com/") == "200"
    agent.restart()
    # no new DNS query: the learned IP is still allowed after the restart
    assert curl(agent, f"http://{outside.addr(10)}/") == "200"
    assert curl(agent, f"http://{outside.addr(20)}/", timeout=1) == "timeout"
