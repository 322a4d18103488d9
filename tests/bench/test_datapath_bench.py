"""Kernel datapath numbers (issue 7), measured side by side in one run:

- iperf3 TCP between two endpoints with the programs attached and an allowing policy, against the
  same stream with no programs: target >= 0.97x, on the medians of IPERF_ROUNDS rounds of
  streams (the order rotating, iperf3's two ends on one CPU). The programs deliver pod to pod
  themselves (BPF host routing, the default); a third stream in every round has them forward
  through the host's stack instead (--host-routing legacy), so the programs' own cost on the
  stack's path is printed beside it.
- per-packet program cost from kernel.bpf_stats_enabled (run_time_ns / run_cnt): target <= 150 ns.
  bpf_stats is not free: each run is timed between two clock reads, and in a 10 Gbit/s stream the
  program's first instructions and data come from a cold cache. So every round also times a tc
  program that only returns, on the same veths in the same kind of stream: that floor is printed,
  and the cost is judged both raw and net of it.
- syncing 10,000 policy entries: target < 1 s; a one-rule change writes exactly one entry.

Prints the numbers and met/MISSED per target, writes tests/bench/results/datapath.json. Asserts
only that the measurements are real (traffic flowed, programs ran, the diff was one entry).
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
from tests.conftest import need_binary
from tests.kernel.netns import free_octets, link, pod

pytestmark = [pytest.mark.bench, pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(600)]

RESULTS = Path(__file__).with_name("results")
ALLOW = PolicyEntry(False, 0, ("bench",))
IPERF_ROUNDS = 8
IPERF_CPU = 1
NULL_PROGRAM = "int pass(struct __sk_buff *skb) { return 0; }"  # TC_ACT_OK, nothing else


def iperf(client, server_pod, seconds: float, cpu: int | None = None) -> float:
    """Gbit/s of one TCP stream from client to server_pod; with `cpu`, iperf3's client and
    server both run on that CPU (`-A cpu,cpu`)."""
    iperf3 = need_binary("iperf3")
    port = 5201 + int(uuid.uuid4().int % 1000)
    srv = server_pod.popen(
        iperf3, "-s", "-1", "-p", str(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        time.sleep(0.3)
        out = client.run(
            iperf3,
            "-c",
            server_pod.pod_ip,
            "-p",
            str(port),
            "-t",
            str(seconds),
            "-J",
            *(("-A", f"{cpu},{cpu}") if cpu is not None else ()),
            timeout=seconds + 30,
        )
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9
    finally:
        srv.kill()
        srv.wait()


def sysctl(name: str, value: str | None = None) -> str:
    path = Path("/proc/sys") / name.replace(".", "/")
    old = path.read_text().strip()
    if value is not None:
        path.write_text(value)
    return old


def tcp_packet(src: str, dst: str, sport: int, dport: int, flags: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0)
    payload = b"x" * 1000
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    return b"\x02" * 6 + b"\x04" * 6 + b"\x08\x00" + ip + tcp + payload


TC_ACT_REDIRECT = 7


def isolated_costs(dp, local_ifindex: int) -> dict[str, int]:
    """ns per run of a tracked forward packet, its reply, a new denied flow, and a tracked
    packet to a local endpoint (both ends judged in the run) whose veth is local_ifindex (a
    device that exists: a test run's packet comes from it once)."""
    from redirect_bpf import bpfsys, ipcache, structs

    info = structs.EndpointInfo(endpoint_id=9, identity=7009, ifindex=1, flags=3)
    dp.maps["ep_by_ifindex"].put(structs.u32(1), info)  # lo: what test runs see
    dp.ipcache_upsert("10.79.0.2/32", 7010)
    dp.sync_endpoint(
        9, {PolicyKey(7010, 1, 6, 0, 0): ALLOW}, ingress_enforced=True, egress_enforced=True
    )
    fe, te = dp.prog_fds["from_endpoint"], dp.prog_fds["to_endpoint"]
    n = 500_000
    bpfsys.test_run_skb(fe, tcp_packet("10.79.0.1", "10.79.0.2", 1000, 80, 0x02))
    out = {
        "tracked_forward": bpfsys.test_run_skb(
            fe, tcp_packet("10.79.0.1", "10.79.0.2", 1000, 80, 0x10), repeat=n
        )[1],
        "tracked_reply": bpfsys.test_run_skb(
            te, tcp_packet("10.79.0.2", "10.79.0.1", 80, 1000, 0x10), repeat=n
        )[1],
        "new_flow_denied": bpfsys.test_run_skb(
            fe, tcp_packet("10.79.0.1", "10.79.0.3", 1001, 80, 0x02), repeat=n // 10
        )[1],
    }
    # The same packet to a local endpoint with host routing: both ends judged in one run
    # (egress of 9, ingress of 10), then the peer redirect (which a test run only records).
    # The flow's first packet goes through the stack, where 10's to_endpoint sees it and its
    # entry learns 10's MACs; from the next one on, packets are handed over.
    peer = structs.EndpointInfo(
        endpoint_id=10, identity=7010, ifindex=local_ifindex, ipv4=ipcache.be32("10.79.0.2"),
        flags=3,
    )  # fmt: skip
    dp.maps["ep_by_ifindex"].put(structs.u32(local_ifindex), peer)
    dp.maps["ep_by_ip"].put(structs.u32(peer.ipv4), peer)
    dp.ipcache_upsert("10.79.0.1/32", 7009)  # the source, as 10's ingress sees it
    dp.sync_endpoint(
        10, {PolicyKey(7009, INGRESS, 6, 0, 0): ALLOW}, ingress_enforced=True, egress_enforced=True
    )
    dp.set_host_routing(True)
    syn = tcp_packet("10.79.0.1", "10.79.0.2", 1002, 80, 0x02)
    assert bpfsys.test_run_skb(fe, syn)[0] == 0  # to the stack
    bpfsys.test_run_skb(te, syn, ifindex=local_ifindex)
    rc, out["tracked_to_local_endpoint"] = bpfsys.test_run_skb(
        fe, tcp_packet("10.79.0.1", "10.79.0.2", 1002, 80, 0x10), repeat=n
    )
    assert rc == TC_ACT_REDIRECT, rc
    dp.maps["ep_by_ip"].delete(structs.u32(peer.ipv4))
    dp.maps["ep_by_ifindex"].delete(structs.u32(local_ifindex))
    dp.maps["ep_by_ifindex"].delete(structs.u32(1))
    return out


def rx_packets(pods) -> int:
    """Packets the pods' host-side veths have received: each is one packet leaving a pod."""
    return sum(link(p.host_if)["stats64"]["rx"]["packets"] for p in pods)


def stream_cost(progs: dict[str, int], a, b, seconds: float) -> tuple[int, int, int]:
    """(run_time_ns, run_cnt, packets) of progs summed over one iperf3 stream a->b, bpf_stats
    on; packets: those that left the two pods (segments and ACKs), each one pod-to-pod packet."""
    from redirect_bpf import counters

    old = sysctl("kernel.bpf_stats_enabled", "1")
    try:
        before = counters.prog_stats(progs)
        packets = rx_packets((a, b))
        iperf(a, b, seconds)
        packets = rx_packets((a, b)) - packets
        after = counters.prog_stats(progs)
    finally:
        sysctl("kernel.bpf_stats_enabled", old)
    return (
        sum(after[n][0] - before[n][0] for n in progs),
        sum(after[n][1] - before[n][1] for n in progs),
        packets,
    )


def null_program():
    """NULL_PROGRAM loaded (bcc module, prog fd): a tc program that only returns TC_ACT_OK."""
    from bcc import BPF

    bpf = BPF(text=NULL_PROGRAM)
    return bpf, bpf.load_func("pass", BPF.SCHED_CLS).fd


def floor_cost(fd: int, a, b, seconds: float) -> tuple[int, int]:
    """stream_cost of the null program on both hooks of both veths: the measurement's floor."""
    from redirect_bpf import tc

    try:
        for pod_ in (a, b):
            tc.attach(pod_.host_if, ingress_fd=fd, egress_fd=fd, name="bench-null")
        return stream_cost({"pass": fd}, a, b, seconds)[:2]
    finally:
        for pod_ in (a, b):
            tc.detach(pod_.host_if)


def fmt(values: list[float], digits: int = 0) -> str:
    return ", ".join(f"{x:.{digits}f}" for x in values)


def status(ok: bool) -> str:
    return "met" if ok else "MISSED"


def test_datapath_numbers():
    from redirect_bpf.datapath import Datapath

    seconds = max(3.0, bench_duration() / 2)
    iperf_seconds = 3.0  # per throughput stream (IPERF_ROUNDS rounds of three)
    pin = f"/sys/fs/bpf/l7proxy/bench-{uuid.uuid4().hex[:8]}"
    o = free_octets(2)
    results: dict = {"seconds_per_run": seconds}
    with pod(o[0]) as a, pod(o[1]) as b:
        dp = Datapath(pin, node="bench")
        null_bpf = None
        try:
            null_bpf, null_fd = null_program()
            # -- iperf3: paired rounds without/with, the order alternating (shared machine)
            bare, prog, legacy = [], [], []
            ns = cnt = pkts = 0  # program run time, runs and pod packets over the "with" streams
            per_round: list[float] = []  # ns per run of each "with" run
            per_round_legacy: list[float] = []  # the same with legacy host routing
            # Program time per pod-to-pod packet (host routing judges a packet in one run,
            # legacy routing in two: from_endpoint, then to_endpoint on the far veth)
            per_packet_round: list[float] = []
            per_packet_round_legacy: list[float] = []
            runs_per_packet: list[float] = []
            runs_per_packet_legacy: list[float] = []
            floor_ns = floor_cnt = 0  # the same for NULL_PROGRAM
            floor_round: list[float] = []

            def attach(host_routing: bool = True) -> None:
                dp.set_host_routing(host_routing)
                dp.attach_endpoint(a.host_if, 1, 7001, a.pod_ip)
                dp.attach_endpoint(b.host_if, 2, 7002, b.pod_ip)
                dp.sync_endpoint(
                    1,
                    {PolicyKey(7002, 1, 6, 0, 0): ALLOW},
                    ingress_enforced=True,
                    egress_enforced=True,
                )
                dp.sync_endpoint(
                    2,
                    {PolicyKey(7001, INGRESS, 6, 0, 0): ALLOW},
                    ingress_enforced=True,
                    egress_enforced=True,
                )

            def detach() -> None:
                dp.detach_endpoint(a.host_if)
                dp.detach_endpoint(b.host_if)

            # Throughput with the programs as a user runs them: bpf_stats off (it adds two
            # clock reads to every program run). A free-running stream on this 2-vCPU VM swings
            # by +-20 % from run to run whatever is attached (paired ratios 0.74-1.38 in one
            # run of 8 pairs), so both ends of iperf3 run on one CPU (the stream is bound by
            # that CPU, the programs' cost shows in full: ratios 0.93-1.12), IPERF_ROUNDS
            # rounds of the three streams, their order rotating, judged on the ratio of the
            # medians.
            cpu = IPERF_CPU if IPERF_CPU < (os.cpu_count() or 1) else 0
            arms = ("without", "with", "legacy")
            for r in range(IPERF_ROUNDS):
                for arm in arms[r % 3 :] + arms[: r % 3]:
                    if arm == "without":
                        bare.append(iperf(a, b, iperf_seconds, cpu))
                        continue
                    attach(host_routing=arm == "with")
                    (prog if arm == "with" else legacy).append(iperf(a, b, iperf_seconds, cpu))
                    detach()
            # Then separate streams measure the per-run cost with the stats on, and the floor
            # (NULL_PROGRAM) in the same kind of stream.
            old_stats = sysctl("kernel.bpf_stats_enabled")
            try:
                progs = {n: dp.prog_fds[n] for n in ("from_endpoint", "to_endpoint")}
                for _ in range(3):
                    attach()
                    round_ns, round_cnt, round_packets = stream_cost(progs, a, b, seconds)
                    ns, cnt, pkts = ns + round_ns, cnt + round_cnt, pkts + round_packets
                    per_round.append(round_ns / max(round_cnt, 1))
                    per_packet_round.append(round_ns / max(round_packets, 1))
                    runs_per_packet.append(round_cnt / max(round_packets, 1))
                    dp.set_host_routing(False)  # the same attachment, the host's stack between
                    l_ns, l_cnt, l_packets = stream_cost(progs, a, b, seconds)
                    per_round_legacy.append(l_ns / max(l_cnt, 1))
                    per_packet_round_legacy.append(l_ns / max(l_packets, 1))
                    runs_per_packet_legacy.append(l_cnt / max(l_packets, 1))
                    detach()
                    f_ns, f_cnt = floor_cost(null_fd, a, b, seconds)
                    floor_ns, floor_cnt = floor_ns + f_ns, floor_cnt + f_cnt
                    floor_round.append(f_ns / max(f_cnt, 1))
            finally:
                sysctl("kernel.bpf_stats_enabled", old_stats)
            ratio = statistics.median(prog) / statistics.median(bare)
            paired = statistics.median(w / n for w, n in zip(prog, bare, strict=True))
            legacy_ratio = statistics.median(legacy) / statistics.median(bare)
            assert cnt > 0 and floor_cnt > 0, "the programs never ran"
            per_run = ns / cnt
            floor = floor_ns / floor_cnt
            # Every pod-to-pod packet is judged at both ends (the source's egress, the
            # destination's ingress): in two runs with legacy routing, in one with host routing.
            # The cost per end judged is what a run cost before one run judged both; net, each
            # run's floor taken off.
            per_end = ns / (2 * max(pkts, 1))
            per_end_net = (ns - cnt * floor) / (2 * max(pkts, 1))
            results |= {
                "iperf3_gbps_without": bare,
                "iperf3_gbps_with": prog,
                "iperf3_ratio": ratio,
                "iperf3_ratio_paired_median": paired,
                "iperf3_ratio_best_of_each": max(prog) / max(bare),
                "iperf3_gbps_legacy_routing": legacy,
                "iperf3_ratio_legacy_routing": legacy_ratio,
                "program_runs": cnt,
                "ns_per_run": per_run,
                "ns_per_packet_per_run": per_round,
                "ns_per_packet_per_run_legacy_routing": per_round_legacy,
                "floor_ns_per_run": floor,
                "floor_ns_per_run_per_round": floor_round,
                "ns_per_run_net": per_run - floor,
                "ns_per_end_judged": per_end,
                "ns_per_end_judged_net": per_end_net,
                "ns_per_pod_packet": per_packet_round,
                "ns_per_pod_packet_legacy_routing": per_packet_round_legacy,
                "runs_per_pod_packet": runs_per_packet,
                "runs_per_pod_packet_legacy_routing": runs_per_packet_legacy,
            }

            # -- the same programs in isolation (BPF_PROG_TEST_RUN, no stats overhead)
            results["test_run_ns"] = isolated_costs(dp, socket.if_nametoindex(b.host_if))

            # -- sync 10,000 entries, then one rule
            state = {
                PolicyKey(100_000 + i, INGRESS, 6, 1000 + i % 50000, 16): ALLOW
                for i in range(10_000)
            }
            t0 = time.perf_counter()
            full = dp.sync_endpoint(99, state, ingress_enforced=True, egress_enforced=False)
            full_s = time.perf_counter() - t0
            assert full.adds == 10_000
            changed = dict(state)
            changed[PolicyKey(55, INGRESS, 17, 53, 16)] = ALLOW
            one = dp.sync_endpoint(99, changed, ingress_enforced=True, egress_enforced=False)
            assert one.touched == 1
            results |= {"sync_10000_s": full_s, "sync_one_rule_s": one.seconds}
        finally:
            if null_bpf is not None:
                null_bpf.cleanup()
            dp.destroy()

    targets = {
        "iperf3 with/without >= 0.97 (ratio of the medians)": status(ratio >= 0.97),
        "program cost <= 150 ns per end judged, raw bpf_stats": status(per_end <= 150),
        "program cost <= 150 ns per end judged, net of the measured floor": status(
            per_end_net <= 150
        ),
        "sync 10,000 entries < 1 s": status(full_s < 1.0),
    }
    results["targets"] = targets
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "datapath.json").write_text(json.dumps(results, indent=2))
    load = open("/proc/loadavg").read().split()[:3]
    print(
        f"\ndatapath (load average {' '.join(load)}): iperf3 median without "
        f"{statistics.median(bare):.2f} Gbit/s, with {statistics.median(prog):.2f} Gbit/s: ratio "
        f"{ratio:.3f} (median of the {IPERF_ROUNDS} paired ratios {paired:.3f}, best of each "
        f"{max(prog) / max(bare):.3f}; runs without {' '.join(f'{x:.1f}' for x in bare)}, with "
        f"{' '.join(f'{x:.1f}' for x in prog)})\n"
        f"datapath: the same programs forwarding through the host's stack (--host-routing legacy): "
        f"median {statistics.median(legacy):.2f} Gbit/s, ratio {legacy_ratio:.3f} (runs "
        f"{' '.join(f'{x:.1f}' for x in legacy)})\n"
        f"datapath: {per_run:.1f} ns per program run over {cnt} runs (bpf_stats, on a separate stream; "
        f"per iperf3 run: {fmt(per_round)}; with legacy host routing: "
        f"{fmt(per_round_legacy)})\n"
        f"datapath: program time per pod-to-pod packet: {fmt(per_packet_round)} ns in "
        f"{fmt(runs_per_packet, 2)} runs; with legacy host routing "
        f"{fmt(per_packet_round_legacy)} ns in {fmt(runs_per_packet_legacy, 2)} runs\n"
        f"datapath: floor (a program that only returns, same stream) {floor:.1f} ns per run "
        f"({fmt(floor_round)}): net {per_run - floor:.1f} ns per run\n"
        f"datapath: per end judged (two per pod-to-pod packet): {per_end:.1f} ns raw, "
        f"{per_end_net:.1f} ns net of the floor\n"
        f"datapath: isolated test runs (ns): {results['test_run_ns']}\n"
        f"datapath: sync 10,000 entries {full_s * 1000:.1f} ms, one-rule change "
        f"{one.seconds * 1e6:.0f} us touching {one.touched} entry\n"
        + "\n".join(f"  {k}: {v}" for k, v in targets.items()),
        flush=True,
    )
