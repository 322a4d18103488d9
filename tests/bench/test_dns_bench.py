"""DNS proxy numbers (issue 21), node mode through the agent, in the e2e test's lab (dnsmasq in an
outside namespace): the latency the proxy adds at 1,000 q/s (p50/p99, vs the same dnsmasq
queried directly on a port without a dns rule), queries per second through the proxy vs direct
(32 in flight, one client), and first-connect success over 1,000 fresh names (each resolved and
connected to at once; every name is new, so every answer is held for a datapath update).
Prints one table. Noisy on a shared 2-core machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.agent_runner import AgentProcess, free_pool
from tests.e2e.test_agent_dns import Outside

pytestmark = [pytest.mark.bench, pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(600)]

FRESH = 1000
POLICY = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: dns-bench}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
  - toCIDR: [{dns}/32]
    toPorts:
    - ports: [{{port: "53", protocol: UDP}}]
      rules:
        dns: [{{matchPattern: "*.example.com"}}, {{matchPattern: "*.fresh.example.com"}}]
  - toCIDR: [{dns}/32]
    toPorts:
    - ports: [{{port: "5353", protocol: UDP}}]
  - toFQDNs: [{{matchPattern: "*.fresh.example.com"}}]
    toPorts:
    - ports: [{{port: "80", protocol: TCP}}]
"""

LOAD = textwrap.dedent(
    """
    import json, socket, sys, time, dns.message
    server, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    wire = dns.message.make_query("api.example.com.", "A")
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect((server, port))
    s.settimeout(2)
    def one(i):
        wire.id = i & 0xFFFF
        t = time.perf_counter(); s.send(wire.to_wire())
        while True:
            data = s.recv(4096)
            if data[:2] == wire.to_wire()[:2]:
                return time.perf_counter() - t
    for i in range(50):
        one(i)  # warm up (and learn the name once)
    if mode == "latency":  # paced at 1,000 q/s for 3 s
        lat, start = [], time.perf_counter()
        for i in range(3000):
            wait = start + i / 1000 - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            lat.append(one(i))
        lat.sort()
        print(json.dumps({"p50_ms": lat[len(lat) // 2] * 1e3, "p99_ms": lat[int(len(lat) * .99)] * 1e3}))
    else:  # 32 in flight for 3 s
        s.setblocking(True); s.settimeout(1)
        q = wire.to_wire(); done, sent, t0 = 0, 0, time.perf_counter()
        for _ in range(32):
            s.send(q); sent += 1
        while time.perf_counter() - t0 < 3:
            try:
                s.recv(4096); done += 1
            except socket.timeout:
                break
            s.send(q); sent += 1
        print(json.dumps({"qps": done / (time.perf_counter() - t0)}))
    """
)
FIRST_CONNECT = textwrap.dedent(
    """
    import socket, sys
    ok, bad = 0, []
    for i in range(int(sys.argv[1])):
        ip = socket.gethostbyname(f"n{i}.fresh.example.com")
        try:
            socket.create_connection((ip, 80), timeout=1).close(); ok += 1
        except OSError as exc:
            bad.append(f"{ip}: {exc}")
    print(ok, "; ".join(bad[:5]))
    """
)


class BenchOutside(Outside):
    """The e2e lab plus a second dnsmasq on :5353 (the direct path) and 1,000 fresh names whose
    addresses (198.19.0.0/16) the outside namespace accepts as local."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.run("ip", "route", "add", "local", "198.19.0.0/16", "dev", "lo")
        subprocess.run(["ip", "route", "add", "198.19.0.0/16", "via", self.addr(1)], check=False)
        self.run("ip", "addr", "add", f"{self.addr(1)}/24", "dev", "w1")
        fresh = [f"--host-record=n{i}.fresh.example.com,198.19.{i // 250}.{i % 250 + 1},300"
                 for i in range(FRESH)]  # fmt: skip
        base = ["dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces",
                f"--listen-address={self.addr(53)}", "--except-interface=lo", "--pid-file=",
                "--user=root", f"--host-record=api.example.com,{self.addr(10)},300"]  # fmt: skip
        self.procs[0].kill()  # the e2e zone's dnsmasq: replaced by one with the fresh names
        self.procs[0].wait()
        self.spawn(*base, "--port=53", *fresh)
        self.spawn(*base, "--port=5353")

    def close(self) -> None:
        subprocess.run(["ip", "route", "del", "198.19.0.0/16"], check=False)
        super().close()


def _in_pod(agent, *args, timeout=120) -> str:
    r = subprocess.run(["ip", "netns", "exec", agent.prefix + "client", *args],
                       capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_dns_proxy_numbers(tmp_path):
    agent = AgentProcess(pool=free_pool(), bpf=True)
    agent.start()
    outside = None
    try:
        outside = BenchOutside(agent.prefix)
        agent.cli("endpoint", "create", "client", "--labels", "app=client", check=True)
        (tmp_path / "p.yaml").write_text(POLICY.format(dns=outside.addr(53)))
        agent.cli("policy", "import", str(tmp_path / "p.yaml"), check=True)
        etc = __import__("pathlib").Path("/etc/netns") / (agent.prefix + "client")
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {outside.addr(53)}\n")
        import time

        time.sleep(1)
        rows = {}
        for label, port in (("direct", "5353"), ("proxy", "53")):
            lat = json.loads(
                _in_pod(agent, sys.executable, "-c", LOAD, outside.addr(53), port, "latency")
            )
            qps = json.loads(
                _in_pod(agent, sys.executable, "-c", LOAD, outside.addr(53), port, "qps")
            )
            rows[label] = {**lat, **qps}
        ok, _, bad = _in_pod(
            agent, sys.executable, "-c", FIRST_CONNECT, str(FRESH), timeout=600
        ).partition(" ")
        ok = int(ok)
        metrics = agent.cli("metrics").stdout
        hold = [ln for ln in metrics.splitlines() if ln.startswith("fqdn_datapath_update_seconds_")]
        print("\nDNS proxy (node mode), dnsmasq in a namespace, one client")
        print(f"{'path':8} {'p50 ms':>8} {'p99 ms':>8} {'q/s':>8}")
        for label, row in rows.items():
            print(f"{label:8} {row['p50_ms']:8.3f} {row['p99_ms']:8.3f} {row['qps']:8.0f}")
        added = rows["proxy"]["p99_ms"] - rows["direct"]["p99_ms"]
        print(f"added p50 {rows['proxy']['p50_ms'] - rows['direct']['p50_ms']:.3f} ms, p99 {added:.3f} ms;"
              f" q/s ratio {rows['proxy']['qps'] / rows['direct']['qps']:.2f}")  # fmt: skip
        print(f"first connect after the answer: {ok}/{FRESH} fresh names {bad.strip()}")
        if ok != FRESH:
            print(agent.cli("observe", "--verdict", "DROPPED", "--last", "20").stdout)
        print("\n".join(hold[-3:]))
        assert ok == FRESH
    finally:
        import shutil

        shutil.rmtree(f"/etc/netns/{agent.prefix}client", ignore_errors=True)
        if outside is not None:
            outside.close()
        agent.close()
