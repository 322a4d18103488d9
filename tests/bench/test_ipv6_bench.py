"""IPv6 datapath numbers (issue 17), side by side in one run:

- iperf3 over IPv6 between two dual-stack endpoints with the programs attached and an allowing
  policy, against the same stream with no programs: target >= 0.97x, judged on the ratio of the
  medians of `BENCH_ROUNDS` (default 6) rounds whose order alternates;
- per-packet cost in isolation (BPF_PROG_TEST_RUN) of a tracked IPv6 packet, next to the same
  IPv4 packet: the IPv6 path's extra cost is its 128-bit keys.

Prints the numbers and met/MISSED, writes tests/bench/results/ipv6.json. Asserts only that the
measurements are real (traffic flowed).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import struct
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from policies import INGRESS, PolicyEntry, PolicyKey
from tests.bench.conftest import bench_duration
from tests.bench.test_datapath_bench import tcp_packet
from tests.conftest import need_binary
from tests.kernel.netns import free_octets
from tests.kernel.netns6 import free_subnets, pod6

pytestmark = [pytest.mark.bench, pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(600)]

RESULTS = Path(__file__).with_name("results")
ALLOW = PolicyEntry(False, 0, ("bench",))
ROUNDS = max(2, int(os.environ.get("BENCH_ROUNDS", "6")))


def iperf6(client, server, seconds: float) -> float:
    """Gbit/s of one TCP stream over IPv6 from client to server."""
    iperf3 = need_binary("iperf3")
    port = 5201 + int(uuid.uuid4().int % 1000)
    srv = subprocess.Popen(
        ["ip", "netns", "exec", server.netns, iperf3, "-s", "-1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        out = client.run(
            iperf3, "-6", "-c", server.pod_ip6, "-p", str(port), "-t", str(seconds), "-J",
            timeout=seconds + 30,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        srv.kill()
        srv.wait()


def tcp6_packet(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0)
    payload = b"x" * 1000
    ip6 = struct.pack("!IHBB", 6 << 28, len(tcp) + len(payload), 6, 64)
    ip6 += socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst)
    return b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + ip6 + tcp + payload


def isolated(dp) -> dict[str, int]:
    """ns per run of a tracked forward packet, IPv4 and IPv6, through from_endpoint."""
    from redirect_bpf import bpfsys, structs

    info = structs.EndpointInfo(endpoint_id=9, identity=7009, ifindex=1, flags=3)
    dp.maps["ep_by_ifindex"].put(structs.u32(1), info)
    dp.ipcache_upsert("10.79.0.2/32", 7010)
    dp.ipcache_upsert("fd00:79::2/128", 7010)
    dp.sync_endpoint(
        9, {PolicyKey(7010, 1, 6, 0, 0): ALLOW}, ingress_enforced=True, egress_enforced=True
    )
    fe, n = dp.prog_fds["from_endpoint"], 500_000
    v4 = ("10.79.0.1", "10.79.0.2")
    v6 = ("fd00:79::1", "fd00:79::2")
    bpfsys.test_run_skb(fe, tcp_packet(*v4, 1000, 80, 0x02))
    bpfsys.test_run_skb(fe, tcp6_packet(*v6, 1000, 80, 0x02))
    out = {
        "v4_tracked_forward": bpfsys.test_run_skb(fe, tcp_packet(*v4, 1000, 80, 0x10), repeat=n)[1],
        "v6_tracked_forward": bpfsys.test_run_skb(fe, tcp6_packet(*v6, 1000, 80, 0x10), repeat=n)[
            1
        ],
        "v4_new_denied": bpfsys.test_run_skb(
            fe, tcp_packet("10.79.0.1", "10.79.0.3", 1001, 80, 0x02), repeat=n // 10
        )[1],
        "v6_new_denied": bpfsys.test_run_skb(
            fe, tcp6_packet("fd00:79::1", "fd00:79::3", 1001, 80, 0x02), repeat=n // 10
        )[1],
    }
    dp.maps["ep_by_ifindex"].delete(structs.u32(1))
    return out


def test_ipv6_datapath_numbers():
    from redirect_bpf.datapath import Datapath

    seconds = max(3.0, bench_duration() / 2)
    subnets, octets = free_subnets(2), free_octets(2)
    with pod6(subnets[0], octets[0]) as a, pod6(subnets[1], octets[1]) as b:
        dp = Datapath(f"/sys/fs/bpf/l7proxy/bench-{uuid.uuid4().hex[:8]}", node="bench")
        try:
            bare, prog = [], []

            def attach() -> None:
                dp.attach_endpoint(a.host_if, 1, 7001, a.pod_ip, a.pod_ip6)
                dp.attach_endpoint(b.host_if, 2, 7002, b.pod_ip, b.pod_ip6)
                dp.sync_endpoint(
                    1, {PolicyKey(7002, 1, 6, 0, 0): ALLOW}, ingress_enforced=True,
                    egress_enforced=True,
                )  # fmt: skip
                dp.sync_endpoint(
                    2, {PolicyKey(7001, INGRESS, 6, 0, 0): ALLOW}, ingress_enforced=True,
                    egress_enforced=True,
                )  # fmt: skip

            def detach() -> None:
                dp.detach_endpoint(a.host_if)
                dp.detach_endpoint(b.host_if)

            # Rounds of one stream each way, the order alternating (bare first, then programs
            # first), so neither side always meets the warmer or the quieter moment.
            for r in range(ROUNDS):
                if r % 2 == 0:
                    bare.append(iperf6(a, b, seconds))
                    attach()
                    prog.append(iperf6(a, b, seconds))
                    detach()
                else:
                    attach()
                    prog.append(iperf6(a, b, seconds))
                    detach()
                    bare.append(iperf6(a, b, seconds))
            costs = isolated(dp)
        finally:
            dp.destroy()
    assert min(bare) > 0 and min(prog) > 0
    # The verdict: the ratio of the two medians (one stream swings +-15 % on a 2-core VM, so
    # one best-of-3 pair cannot resolve 3 %); the best-of ratio and per-round ratios are kept.
    ratio = statistics.median(prog) / statistics.median(bare)
    best = max(prog) / max(bare)
    rounds = [p / q for p, q in zip(prog, bare, strict=True)]
    results = {
        "iperf3_v6_gbps_without": bare,
        "iperf3_v6_gbps_with": prog,
        "iperf3_v6_ratio": ratio,
        "iperf3_v6_ratio_best_of": best,
        "iperf3_v6_ratio_per_round": rounds,
        "test_run_ns": costs,
        "targets": {"iperf3 over IPv6 with/without >= 0.97": "met" if ratio >= 0.97 else "MISSED"},
    }
    load = open("/proc/loadavg").read().split()[:3]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ipv6.json").write_text(json.dumps(results, indent=2))
    print(
        f"\nipv6 (load average {' '.join(load)}): iperf3 median without "
        f"{statistics.median(bare):.2f} Gbit/s, with {statistics.median(prog):.2f} Gbit/s "
        f"(ratio of medians {ratio:.3f}; best of each {best:.3f}; per round "
        f"{' '.join(f'{x:.3f}' for x in rounds)})\nipv6: isolated test runs (ns): {costs}\n"
        + "\n".join(f"  {k}: {v}" for k, v in results["targets"].items()),
        flush=True,
    )
