"""toFQDNs over time (root, real kernel, a real DNS server): names whose IPs rotate on every
answer (the S3 case) and a deleted endpoint's names.

The upstream is a small authoritative DNS server of the test's own (dnspython, real UDP sockets,
in the outside namespace), because dnsmasq and unbound do not rotate: every answer for
`s3.rot.example.com` (TTL 300) and `short.rot.example.com` (TTL 1) is a new address in
198.19.N.0/24, which the outside namespace accepts as local (HTTP on :80). The agent keeps at most
CAP unexpired IPs per name per endpoint.

- 100 queries in a row, each a new IP: every connect right after its answer passes, and the
  kernel's ipcache holds at most CAP of the long-TTL name's IPs and none of the expired short
  ones after a GC round (it does not grow with the number of answers).
- Deleting an endpoint drops its names: an IP only it had leaves the kernel's ipcache and the
  identity of a selector set only it used is released; an IP another endpoint also learned
  stays; both still hold after an agent restart."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest

from redirect_bpf import ipcache, loader
from tests.agent_runner import AgentProcess, free_pool
from tests.e2e.dns_lab import dns_lab
from tests.e2e.test_agent_dns import Outside, ok, sh

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(240)]

CAP = 10
ROTATOR = textwrap.dedent(
    """
    # answers A queries for *.rot.example.com from its own zone; rotating names get the next
    # address of their range on every answer
    import socket, sys, dns.message, dns.rcode, dns.rrset
    listen, net = sys.argv[1], sys.argv[2]
    rotating = {"s3.rot.example.com.": (1, 120, 300), "short.rot.example.com.": (130, 250, 1)}
    fixed = {"a.rot.example.com.": 251, "shared.rot.example.com.": 252, "solo.rot.example.com.": 253}
    turn = {name: lo for name, (lo, _, _) in rotating.items()}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((listen, 53))
    while True:
        wire, client = s.recvfrom(4096)
        try:
            query = dns.message.from_wire(wire)
        except Exception:
            continue
        answer = dns.message.make_response(query)
        name = str(query.question[0].name).lower()
        if name in rotating:
            lo, hi, ttl = rotating[name]
            host, turn[name] = turn[name], lo if turn[name] >= hi else turn[name] + 1
        elif name in fixed:
            host, ttl = fixed[name], 300
        else:
            answer.set_rcode(dns.rcode.NXDOMAIN); s.sendto(answer.to_wire(), client); continue
        answer.answer.append(dns.rrset.from_text(name, ttl, "IN", "A", f"{net}.{host}"))
        s.sendto(answer.to_wire(), client)
    """
)
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: fqdn-rotating}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDR: [{dns}/32]
    toPorts:
    - ports: [{{port: "53", protocol: UDP}}]
      rules:
        dns: [{{matchPattern: "*.rot.example.com"}}]
  - toFQDNs: [{{matchPattern: "*.rot.example.com"}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
  - toFQDNs: [{{matchName: solo.rot.example.com}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
"""
RESOLVE_AND_CONNECT = textwrap.dedent(
    """
    # each name: ask the server, connect to the answer's IP at once (1 s: the first SYN only)
    import socket, sys, dns.message, dns.query
    server, names = sys.argv[1], sys.argv[2:]
    bad, seen = [], []
    for name in names:
        reply = dns.query.udp(dns.message.make_query(name, "A"), server, timeout=2)
        ip = reply.answer[0][0].address
        seen.append(ip)
        try:
            socket.create_connection((ip, 80), timeout=1).close()
        except OSError as exc:
            bad.append(f"{name} {ip}: {exc}")
    print(len(set(seen)), len(bad), bad[:3])
    """
)


class RotatingOutside(Outside):
    """The e2e outside namespace plus the rotating server on .54 and 198.19.N.0/24 local."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.rot_net = f"198.19.{self.net}"
        self.run("ip", "addr", "add", f"{self.addr(54)}/24", "dev", "w1")
        self.run("ip", "addr", "add", f"{self.addr(1)}/24", "dev", "w1")
        self.run("ip", "route", "add", "local", f"{self.rot_net}.0/24", "dev", "lo")
        sh("ip", "route", "add", f"{self.rot_net}.0/24", "via", self.addr(1))
        self.spawn(sys.executable, "-c", ROTATOR, self.addr(54), self.rot_net)
        deadline = time.monotonic() + 10
        while sh("dig", f"@{self.addr(54)}", "+short", "+time=1", "+tries=1", "a.rot.example.com",
                 check=False).stdout.strip() != f"{self.rot_net}.251":  # fmt: skip
            assert time.monotonic() < deadline, "the rotating DNS server did not answer"
            time.sleep(0.1)

    def close(self) -> None:
        sh("ip", "route", "del", f"{self.rot_net}.0/24", check=False)
        super().close()


@pytest.fixture(scope="module")
def lab():
    agent = AgentProcess(
        pool=free_pool(), bpf=True, extra_args=("--dns-max-ips-per-name", str(CAP))
    )
    pods = ("client", "client2")
    with dns_lab(agent, RotatingOutside, POLICY, pods=pods, dns_host=54) as outside:
        yield agent, outside


def resolve_and_connect(agent, outside, pod: str, names: list[str]) -> tuple[int, int, str]:
    r = subprocess.run(
        ["ip", "netns", "exec", agent.prefix + pod, sys.executable, "-c", RESOLVE_AND_CONNECT,
         outside.addr(54), *names],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    distinct, bad, detail = r.stdout.split(" ", 2)
    return int(distinct), int(bad), detail


def kernel_ipcache(agent, net: str) -> dict[str, int]:
    """{ip: identity} of the pinned ipcache's /32 entries inside `net`.0/24."""
    loaded = loader.open_pinned(agent.pin_dir)
    try:
        return {
            ipcache.cidr_of(k)[:-3]: v.identity
            for k, v in loaded.maps["ipcache"].items()
            if k.prefixlen == 32 and ipcache.cidr_of(k).startswith(net + ".")
        }
    finally:
        loaded.close()


def fqdn_status(agent) -> dict:
    return json.loads(ok(agent, "status", "-o", "json"))["parts"]["fqdn"]


def wait_for(predicate, timeout: float = 6.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.2)


def test_rotating_ips_every_connect_passes_and_the_ipcache_stays_bounded(lab):
    agent, outside = lab
    net = outside.rot_net
    distinct, bad, detail = resolve_and_connect(
        agent, outside, "client", ["s3.rot.example.com"] * 100
    )
    assert (distinct, bad) == (100, 0), detail  # 100 new IPs, 100 first connects
    distinct, bad, detail = resolve_and_connect(
        agent, outside, "client", ["short.rot.example.com"] * 100
    )
    assert (distinct, bad) == (100, 0), detail

    def bounded():
        entries = kernel_ipcache(agent, net)
        s3 = [ip for ip in entries if int(ip.rsplit(".", 1)[1]) <= 120]
        short = [ip for ip in entries if 130 <= int(ip.rsplit(".", 1)[1]) <= 250]
        return (s3, short) if len(s3) <= CAP and not short else None

    # after a GC round: the long-TTL name holds at most CAP IPs (the newest), the TTL-1 name none
    found = wait_for(bounded)
    entries = kernel_ipcache(agent, net)
    assert found is not None, f"{len(entries)} ipcache entries in {net}.0/24: {sorted(entries)}"
    s3, _ = found
    assert len(s3) == CAP and f"{net}.100" in s3, sorted(s3)  # the last answers stay allowed
    assert len(set(entries.values())) == 1  # one shared identity for every learned IP
    # the newest long-TTL IP still passes without a new query; an evicted one is dropped
    code = "import socket,sys; socket.create_connection((sys.argv[1], 80), timeout=1).close()"
    pod = ["ip", "netns", "exec", agent.prefix + "client", sys.executable, "-c", code]
    assert subprocess.run([*pod, f"{net}.100"], capture_output=True).returncode == 0
    assert subprocess.run([*pod, f"{net}.5"], capture_output=True).returncode != 0


def test_deleting_an_endpoint_drops_its_names_persistently(lab):
    agent, outside = lab
    net = outside.rot_net
    names = ["a.rot.example.com", "shared.rot.example.com", "solo.rot.example.com"]
    assert resolve_and_connect(agent, outside, "client2", names)[1] == 0
    assert resolve_and_connect(agent, outside, "client", ["shared.rot.example.com"])[1] == 0
    entries = kernel_ipcache(agent, net)
    a, shared, solo = f"{net}.251", f"{net}.252", f"{net}.253"
    assert {a, shared, solo} <= set(entries)
    assert entries[solo] != entries[a] == entries[shared]  # solo's selector set is its own
    before = fqdn_status(agent)

    ok(agent, "endpoint", "delete", "client2")
    entries = kernel_ipcache(agent, net)
    assert shared in entries and a not in entries and solo not in entries, sorted(entries)
    after = fqdn_status(agent)
    assert after["identities"] == before["identities"] - 1, (before, after)  # solo's released
    assert after["ips"] <= before["ips"] - 2

    agent.restart()  # the forgetting was persisted: nothing comes back from the store
    entries = wait_for(
        lambda: kernel_ipcache(agent, net).get(shared) and kernel_ipcache(agent, net)
    )
    assert entries and a not in entries and solo not in entries, sorted(entries or {})
    assert fqdn_status(agent)["identities"] == after["identities"]
    # client never asked for a.rot: its IP stays closed to it; the shared one stays open
    code = "import socket,sys; socket.create_connection((sys.argv[1], 80), timeout=1).close()"
    pod = ["ip", "netns", "exec", agent.prefix + "client", sys.executable, "-c", code]
    assert subprocess.run([*pod, a], capture_output=True).returncode != 0
    assert subprocess.run([*pod, shared], capture_output=True).returncode == 0
