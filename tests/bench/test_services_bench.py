"""Service VIPs: the socket LB against kube-proxy's iptables DNAT, side by side in one run
(issue 16). For 1, 1,000 and 10,000 services: new connections per second (wrk with
`Connection: close`: connect, one request, close) and keep-alive requests per second to the VIP
of the last service (iptables walks KUBE-SERVICES in order, so the last one is its worst case),
and the time to apply one service change (a full iptables-restore, as kube-proxy does, vs the
socket LB's diff sync). Targets: >= 0.95x iptables at 1 service, >= 2x at 10,000. Then the
per-packet cost of the NodePort programs (bpf_stats: run_time_ns / run_cnt) on new connections
to a node port, beside the rate of the same load straight to the backends.

    flock /tmp/l7bench.lock env BENCH_DURATION=3 PYTHONPATH=$PWD .venv/bin/python -m pytest \
        -m bench -s tests/bench/test_services_bench.py
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from redirect_bpf.counters import prog_stats
from tests.bench.services_lab import BACKEND_IP, ServicesLab, vip
from tests.conftest import need_binary

pytestmark = [pytest.mark.bench, pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(1800)]

COUNTS = tuple(int(n) for n in os.environ.get("BENCH_SERVICE_COUNTS", "1,1000,10000").split(","))


@pytest.fixture(scope="module")
def lab():
    for binary in ("wrk", "nginx", "iptables-restore"):
        need_binary(binary)
    lab = ServicesLab().start()
    yield lab
    lab.close()


def test_socket_lb_vs_iptables_dnat(lab, duration):
    seconds = max(1.0, duration)
    rows = []
    for count in COUNTS:
        url = f"http://{vip(count - 1)}/"
        result = {}
        for way in ("iptables", "socket LB"):
            load = lab.use_iptables if way == "iptables" else lab.use_lb
            load(count)
            new = lab.wrk(url, seconds, new_connections=True)
            keep = lab.wrk(url, seconds, new_connections=False)
            change = load(count, changed=count - 1)  # one service's backends change
            result[way] = (new, keep, change)
        rows.append((count, result))
        ipt, lb = result["iptables"], result["socket LB"]
        print(
            f"\nservices={count:>6}  new conn/s: iptables {ipt[0]:>9.0f}  socket LB {lb[0]:>9.0f}"
            f"  ({lb[0] / ipt[0]:.2f}x)   keep-alive req/s: iptables {ipt[1]:>9.0f}"
            f"  socket LB {lb[1]:>9.0f} ({lb[1] / ipt[1]:.2f}x)   one change: iptables-restore "
            f"{ipt[2] * 1000:.1f} ms, map sync {lb[2] * 1000:.2f} ms",
            flush=True,
        )
    for _, result in rows:
        assert all(v > 0 for v in result["socket LB"][:2])


def _bpf_stats(value: str | None = None) -> str:
    path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old = path.read_text().strip()
    if value is not None:
        path.write_text(value)
    return old


def _cost(lab, progs, url: str, seconds: float, new: bool) -> dict[str, tuple[float, int]]:
    """name -> (ns per program run, runs) over one load run with bpf_stats on."""
    old = _bpf_stats("1")  # on only for these runs: it adds a clock read per program run
    try:
        before = prog_stats(progs)
        lab.wrk(url, seconds, new_connections=new)
        after = prog_stats(progs)
    finally:
        _bpf_stats(old)
    cost = {}
    for name in progs:
        ns, runs = (a - b for a, b in zip(after[name], before[name], strict=True))
        cost[name] = (ns / runs if runs else 0.0, runs)
    return cost


def test_nodeport_per_packet_cost(lab, duration):
    """Through the node port (every packet rewritten) and straight to a backend port (the
    programs only look and pass: what all other traffic on the device pays)."""
    seconds = max(1.0, duration)
    progs = lab.use_nodeport(30080)
    url, direct_url = f"http://{BACKEND_IP}:30080/", f"http://{BACKEND_IP}:8080/"
    for new in (True, False):
        direct = lab.wrk(direct_url, seconds, new_connections=new)
        rate = lab.wrk(url, seconds, new_connections=new)
        cost = _cost(lab, progs, url, seconds, new)
        passing = _cost(lab, progs, direct_url, seconds, new)
        what = "new conn/s" if new else "keep-alive req/s"
        print(
            f"\nNodePort, local backends (DNAT + reverse NAT), {what}: direct {direct:.0f}, "
            f"through the node port {rate:.0f} ({rate / direct:.2f}x); ns per program run "
            "through the port / passing by: "
            + ", ".join(
                f"{n} {c:.1f} / {passing[n][0]:.1f} ({r} runs)" for n, (c, r) in cost.items()
            )
            + f"; load average {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        assert rate > 0 and all(runs > 0 for _, runs in cost.values())
