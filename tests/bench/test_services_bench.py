"""Service VIPs: the socket LB against kube-proxy's iptables DNAT, side by side in one run
(issue 16). For 1, 1,000 and 10,000 services: new connections per second (wrk with
`Connection: close`: connect, one request, close) and keep-alive requests per second to the VIP
of the last service (iptables walks KUBE-SERVICES in order, so the last one is its worst case),
and the time to apply one service change (a full iptables-restore, as kube-proxy does, vs the
socket LB's diff sync). Targets: >= 0.95x iptables at 1 service, >= 2x at 10,000.

    flock /tmp/l7bench.lock env BENCH_DURATION=3 PYTHONPATH=$PWD .venv/bin/python -m pytest \
        -m bench -s tests/bench/test_services_bench.py
"""

from __future__ import annotations

import os

import pytest

from tests.bench.services_lab import ServicesLab, vip
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
