"""CPU time per request of HAProxy and the gateway, keep-alive GET (issue 20: where the time goes).

Throughput on a shared 2-core machine swings with whatever else runs; the CPU a proxy spends per
request (user and system time of its process tree over the requests wrk completed) moves much
less, and splits into the proxy's own code and the kernel. Run under the bench lock:

    flock /tmp/l7bench.lock env PYTHONPATH=$PWD python -m tests.bench.cpu_per_request [SECONDS]

`--tree DIR` adds a gateway run from another source tree (before/after, taking turns).

With `--profile DIR` it also records, for the gateway, a py-spy profile (--native, flame graph
SVG and raw collapsed stacks) and `strace -c -f` syscall counts over a short window of the same
load, and `perf stat` for HAProxy (docs/bench.md, "Where the keep-alive GET's time goes").
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from l7proxy.platform import free_port
from tests.bench import peers
from tests.bench.harness import DIRECT, HAPROXY, PROJECT
from tests.bench.peers import PUBLIC_GET, Endpoint, PeerSet, Proc

PATH = "/public/index.html"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process and its children (threads included)."""
    user = system = 0.0
    for p in [pid, *peers._children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11]) / CLK_TCK
        system += int(fields[12]) / CLK_TCK
    return user, system


def wrk(ep: Endpoint, seconds: float, connections: int = 50) -> peers.WrkResult:
    return peers.run_wrk(ep.url_base + PATH, seconds, connections=connections)


def per_request(ep: Endpoint, seconds: float) -> dict:
    before = tree_cpu(ep.proc.pid)
    res = wrk(ep, seconds)
    after = tree_cpu(ep.proc.pid)
    n = max(1, res.requests)
    return {
        "req_s": res.req_s,
        "user_us": (after[0] - before[0]) / n * 1e6,
        "sys_us": (after[1] - before[1]) / n * 1e6,
    }


def _worker_pid(ep: Endpoint) -> int:
    """The process that serves (the gateway's one worker, else the peer itself)."""
    children = peers._children(ep.proc.pid)
    return children[-1] if children else ep.proc.pid


def profile(ep: Endpoint, haproxy: Endpoint, out: Path, seconds: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pid = _worker_pid(ep)
    url = ep.url_base + PATH
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    for fmt, name in (("flamegraph", "gateway.svg"), ("raw", "gateway.collapsed")):
        load = subprocess.Popen(["wrk", "-t1", "-c50", f"-d{int(seconds) + 2}s", url],
                                stdout=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5)
        subprocess.run(
            [spy, "record", "--native", "-r", "997", "-d", str(int(seconds)), "-p", str(pid),
             "-f", fmt, "-o", str(out / name)],
            capture_output=True, check=False,
        )  # fmt: skip
        load.wait()
    # Syscalls per request: strace slows the proxy, the counts per request stay.
    load = subprocess.Popen(["wrk", "-t1", "-c50", "-d4s", url], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    trace = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out / "strace.txt")])
    time.sleep(2.0)
    trace.send_signal(2)
    trace.wait()
    load.wait()
    for peer_ep, name in ((ep, "gateway"), (haproxy, "haproxy")):
        load = subprocess.Popen(["wrk", "-t1", "-c50", "-d4s", peer_ep.url_base + PATH],
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        time.sleep(0.5)
        subprocess.run(
            ["perf", "stat", "-p", str(_worker_pid(peer_ep)), "-o", str(out / f"perf-{name}.txt"),
             "-e", "task-clock,context-switches,instructions,cycles", "--", "sleep", "2"],
            capture_output=True, check=False,
        )  # fmt: skip
        text, _ = load.communicate()
        reqs = peers.parse_wrk(text)
        (out / f"perf-{name}.txt").open("a").write(f"\nwrk: {reqs.req_s:.0f} req/s over 4 s\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("seconds", nargs="?", type=float, default=3.0, help="per round (3)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", type=Path, help="also record py-spy, strace and perf here")
    ap.add_argument(
        "--tree", type=Path, action="append", default=[],
        help="also a gateway run from this source tree (e.g. main's), taking turns",
    )  # fmt: skip
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cpu-per-req-") as tmp:
        work = Path(tmp)
        nginx = peers.start_nginx(work / "nginx")
        try:
            backend = Endpoint(DIRECT, nginx.http_port, nginx.proc)
            with PeerSet(work, backend, [PUBLIC_GET], http2=False) as peer_set:
                eps = [peer_set.get(HAPROXY), peer_set.get(PROJECT)]
                for tree in args.tree:
                    port = free_port()
                    argv = ["env", f"PYTHONPATH={tree}", *peer_set._project(port)]
                    proc = Proc(f"gateway {tree.name}", argv, work).start()
                    peer_set._procs.append(proc)  # (stopped with the others)
                    proc.wait_listening(port)
                    eps.append(Endpoint(str(tree), port, proc))
                rows: dict[str, list[dict]] = {ep.peer: [] for ep in eps}
                for ep in eps:
                    wrk(ep, 1)  # warm-up
                print(f"load average {os.getloadavg()[0]:.2f}")
                for r in range(args.rounds):
                    for ep in eps:
                        m = per_request(ep, args.seconds)
                        rows[ep.peer].append(m)
                        print(
                            f"round {r + 1} {ep.peer:8} {m['req_s']:9,.0f} req/s  "
                            f"user {m['user_us']:5.1f} us  sys {m['sys_us']:5.1f} us  per request"
                        )
                print(f"load average {os.getloadavg()[0]:.2f}")
                for peer, ms in rows.items():
                    cpu = statistics.median(m["user_us"] + m["sys_us"] for m in ms)
                    rps = statistics.median(m["req_s"] for m in ms)
                    print(f"median {peer:8} {rps:9,.0f} req/s  CPU {cpu:5.1f} us per request")
                if args.profile:
                    profile(eps[1], eps[0], args.profile, args.seconds)
        finally:
            nginx.proc.stop()


if __name__ == "__main__":
    main()
