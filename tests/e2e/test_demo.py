"""`make demo` runs in CI: the full Star Wars story with BPF (ending with the cluster part on a
2-node lab), the gateway part, cleanup on interruption, and the dependency map kept up from a
terminal (and not announced without one). tests/lab/test_demo_cluster.py interrupts and kills
the cluster part."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.agent_runner import free_pool
from tests.conftest import need_binary

pytestmark = [pytest.mark.e2e]
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no http_proxy for it
MAP_URL = re.compile(r"https?://\S+/map\b")


def _env() -> tuple[dict, str]:
    prefix = f"l7d{uuid.uuid4().hex[:5]}-"
    env = {**os.environ, "L7PROXY_DEMO_POOL": free_pool(20, 99), "L7PROXY_DEMO_PREFIX": prefix}
    env.pop("DEMO_WAIT", None)  # the demo decides from its stdin alone
    return env, prefix


def _brokers(prefix: str) -> list[str]:
    """noida-db processes of this run: the demo names their data dirs after its prefix."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state == "Z":
            continue  # already dead, waiting to be reaped
        text = b" ".join(argv).decode(errors="replace")
        if "noida-db" in text and f"l7proxy-demo-kafka-{prefix}" in text:
            found.append(f"{proc.name} {text}")
    return found


def _no_brokers_left(prefix: str, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait  # a SIGTERMed broker may take a moment to exit
    while _brokers(prefix) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _brokers(prefix) == [], "a broker this demo run started survived it"


def _leftovers(prefix: str) -> list[str]:
    netns = Path("/var/run/netns")
    names = [p.name for p in netns.iterdir()] if netns.exists() else []
    left = [n for n in names if n.startswith(prefix)]
    pins = Path("/sys/fs/bpf/l7proxy") / prefix.strip("-")
    return left + ([str(pins)] if pins.exists() else [])


def _live_cmdlines() -> list[tuple[int, bytes]]:
    """(pid, NUL-separated argv) of every process that is not a zombie."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
            ):
                found.append((int(proc.name), (proc / "cmdline").read_bytes()))
        except OSError:
            continue
    return found


def lab_leftovers() -> list[str]:
    """What a cluster part could leave: lab namespaces, pins, the lab directory, the lab's etcd
    and agents (their command lines name the lab directory), deathstars in lab endpoints."""
    from l7proxy.lab import state

    netns = Path("/var/run/netns")
    left = (
        [p.name for p in netns.iterdir() if p.name.startswith("l7lab-")] if netns.exists() else []
    )
    pins = state.BPF_PIN_ROOT
    left += [str(p) for p in pins.iterdir() if p.name.startswith("lab-")] if pins.exists() else []
    if state.lab_dir().exists():
        left.append(str(state.lab_dir()))
    for pid, argv in _live_cmdlines():
        if str(state.lab_dir()).encode() in argv or b"demo.deathstar\x0010.252." in argv:
            text = argv.replace(b"\0", b" ").decode(errors="replace")
            left.append(f"pid {pid}: {text}")
    return left


class DemoRun:
    """`python -m demo ARGS` with its output read by a thread, so each wait is bounded."""

    def __init__(self, env: dict, stdin, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "demo", *args],
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: queue.Queue = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self._seen: list[str] = []

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)

    def read_until(self, text: str, within: float = 150) -> str:
        """The demo's output up to the first line with `text`; fails with what it printed when
        the demo ends or stalls first."""
        deadline = time.monotonic() + within
        while not self._seen or text not in self._seen[-1]:
            alive = self.proc.poll() is None or not self.lines.empty()
            assert alive, "demo ended early:\n" + self.seen()
            try:
                self._seen.append(self.lines.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError("demo stalled:\n" + self.seen()) from None
        return self._seen[-1]

    def seen(self) -> str:
        """Everything read so far (after the demo ended: all it printed)."""
        if self.proc.poll() is not None:
            self.reader.join(10)
            while not self.lines.empty():
                self._seen.append(self.lines.get())
        return "".join(self._seen)

    def stop(self) -> None:
        """SIGTERM (the demo cleans up), SIGKILL if it does not end within 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(260)
def test_make_demo_runs_the_star_wars_story_with_bpf():
    need_binary("etcd")
    assert lab_leftovers() == [], "a lab is up: the cluster part would skip"
    env, prefix = _env()
    started = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=250,
        stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - started
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert took < 250
    assert "Root and BPF present" in out
    # The verdicts the demo saw, each printed next to what the policy promises.
    assert "-> xwing: HTTP 200 Ship landed   [expected: lands: ok]" in out
    assert (
        "-> xwing: no answer within 2s (packets dropped)   [expected: dropped in the kernel" in out
    )
    assert "-> tiefighter PUT /v1/exhaust-port: HTTP 403 Access denied   [expected: 403" in out
    assert "-> tiefighter POST /v1/request-landing: HTTP 200 Ship landed" in out
    assert "$ l7proxy policy import" in out and "Revision: 2" in out
    # The observe table after the Star Wars part has the kernel drop, the redirect and the 403.
    table = out.split("=== The Star Wars flows")[1].split("===")[0]
    assert "POLICY_DENIED" in table and "REDIRECTED" in table
    assert re.search(
        r"tiefighter\s+deathstar:80\s+http-request\s+DROPPED\s+.*PUT /v1/exhaust-port", table
    )
    # Kafka and gRPC on endpoints through the node proxy: roles per topic, one rule per method.
    assert "-> empire-outpost produce empire-announce: refused: TopicAuthorization" in out
    assert "-> empire-outpost consume empire-announce: read ['the deathstar is operational']" in out
    assert "-> empire-hq produce deathstar-plans: produced" in out
    # The denied consumer is told so at once (given its topic), not left asking for 4 s.
    assert "-> empire-outpost consume deathstar-plans: refused: TopicAuthorization" in out
    assert "-> terminal SetAccessCode: PERMISSION_DENIED" in out
    assert "-> terminal GetName: Door 42" in out
    table = out.split("=== The Kafka and gRPC flows")[1]
    assert re.search(
        r"kafka-request\s+DROPPED\s+Kafka request \w+ v\d+ topic deathstar-plans", table
    )
    folded = re.findall(r"topic deathstar-plans\s+\(x(\d+)\)", table)
    assert all(int(n) <= 5 for n in folded), f"the denied consumer kept asking: {folded}"
    assert "SetAccessCode) grpc-status PERMISSION_DENIED" in table
    # The cluster part: the same story with the deathstar on node1 and the ships on node2.
    cluster = out.split("=== Cluster: the deathstar on node1")[1]
    assert "$ l7proxy lab up --nodes 2 --routing tunnel" in cluster
    assert "$ l7proxy --node node2 policy import" in cluster
    assert "-> xwing: no answer within 2s (packets dropped)   [expected: dropped in the" in cluster
    assert "-> node1's kernel: " in cluster and "UNEXPECTED" not in cluster
    assert "-> tiefighter PUT /v1/exhaust-port: HTTP 403 Access denied" in cluster
    assert "-> cluster status: node1 on revision 2, node2 on revision 2   [expected" in cluster
    assert "$ l7proxy lab down" in cluster
    assert "27 checks, 0 unexpected" in out
    # Not on a terminal: the agent (and its map) goes at once, so no link to it is printed.
    assert not MAP_URL.search(out) and "Map live at" not in out, out
    assert "The dependency map goes down with the agent now (stdin is not a terminal)" in out
    assert _leftovers(prefix) == []
    assert lab_leftovers() == []
    _no_brokers_left(prefix)


def test_demo_gateway_part_runs_without_kernel_parts():
    env, prefix = _env()
    r = subprocess.run(
        [sys.executable, "-m", "demo", "--gateway"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "tiefighter PUT /v1/exhaust-port: HTTP 403 Access denied" in out
    assert "-> xwing: connection refused or reset" in out
    assert "http-request DROPPED (HTTP/1.1 403" in out, "observe --file shows the L7 deny"
    assert "kafka-request DROPPED" in out and "SetAccessCode: PERMISSION_DENIED" in out
    assert "11 checks, 0 unexpected" in out
    assert not MAP_URL.search(out), "gateway mode has no agent, so no map link"
    _no_brokers_left(prefix)


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(200)
def test_interrupted_demo_cleans_up():
    """SIGTERM once the Kafka broker runs (endpoints, agent, pins, broker all up): everything
    goes, the broker included."""
    env, prefix = _env()
    demo = DemoRun(env, subprocess.DEVNULL, "--no-cluster")
    try:
        # A bounded wait for each line: a demo stuck (slow agent start on a loaded box) fails
        # here with what it printed, instead of blocking the test until pytest's timeout.
        demo.read_until("Kafka policy: produce and consume")
        assert Path("/var/run/netns", prefix + "xwing").exists(), demo.seen()
        assert _brokers(prefix), "the broker runs before the interrupt:\n" + demo.seen()
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.proc.wait(60) == 130, demo.seen()
    finally:
        demo.stop()  # the test failed or timed out: the demo cleans up on SIGTERM
    assert _leftovers(prefix) == []
    _no_brokers_left(prefix)


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.timeout(200)
def test_from_a_terminal_the_map_stays_up_until_enter():
    """stdin is a terminal (a pty): after the checks the demo keeps the agent, prints the map's
    URL, and that URL answers with the demo's endpoints until Enter; then all is torn down and
    the URL is dead."""
    env, prefix = _env()
    terminal, stdin = os.openpty()
    demo = DemoRun(env, stdin, "--no-extras", "--no-cluster")  # Star Wars is enough for a map
    os.close(stdin)
    try:
        line = demo.read_until("Map live at")
        url = re.fullmatch(r"Map live at (\S+) - press Enter \(or Ctrl-C\) to tear down\n", line)
        assert url, line
        url = url[1]
        with LOOPBACK.open(url, timeout=5) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        with LOOPBACK.open(url + ".json", timeout=5) as graph:
            names = {node["name"] for node in json.load(graph)["nodes"]}
        assert {"deathstar", "tiefighter", "xwing"} <= names, names
        time.sleep(1)
        assert demo.proc.poll() is None, "the demo waits for Enter:\n" + demo.seen()
        assert Path("/var/run/netns", prefix + "deathstar").exists()
        os.write(terminal, b"\n")
        assert demo.proc.wait(60) == 0, demo.seen()
    finally:
        demo.stop()
        os.close(terminal)
    out = demo.seen()
    assert "8 checks, 0 unexpected" in out
    assert out.index("8 checks, 0 unexpected") < out.index("Map live at") < out.index("Clean up")
    with pytest.raises(OSError):  # gone with the agent
        LOOPBACK.open(url, timeout=2)
    assert _leftovers(prefix) == []


def test_gateway_copy_of_the_l7_policy_differs_only_in_the_port():
    """Non-root gateway runs use the 8080 copy: it must say exactly what the node-mode file says."""
    import yaml

    from demo import GATEWAY_L7, L7

    node = yaml.safe_load(L7.read_text())
    copy = yaml.safe_load(GATEWAY_L7.read_text())
    assert copy["spec"]["ingress"][0]["toPorts"][0]["ports"] == [
        {"port": "8080", "protocol": "TCP"}
    ]
    copy["spec"]["ingress"][0]["toPorts"][0]["ports"][0]["port"] = "80"
    for doc in (node, copy):
        doc["spec"].pop("description")
    assert copy == node


def test_sweep_brokers_stops_only_orphans_of_its_own_prefix(tmp_path):
    """A demo killed with SIGKILL leaves its broker to init; the next run with the same prefix
    stops it, and leaves brokers of other prefixes and ones with a live parent alone."""
    from demo.broker import sweep as sweep_brokers

    prefix, other = f"l7d{uuid.uuid4().hex[:5]}-", f"l7d{uuid.uuid4().hex[:5]}-"
    fake = "import time; time.sleep(60)"

    def orphan(tag: str) -> int:
        # setsid + a background child whose parent exits at once: init adopts it
        out = subprocess.run(
            ["sh", "-c", f"{sys.executable} -c '{fake}' noida-db --data-dir "
             f"{tmp_path}/l7proxy-demo-kafka-{tag}x >/dev/null 2>&1 & echo $!"],
            capture_output=True, text=True, check=True, start_new_session=True,
        ).stdout  # fmt: skip
        return int(out)

    mine, theirs = orphan(prefix), orphan(other)
    # A broker of a running demo: its parent's command line is `python ... -m demo` (the broker's
    # own argv goes through the environment so the parent's does not look like a broker).
    broker = [sys.executable, "-c", fake, "noida-db", "--data-dir",
              f"{tmp_path}/l7proxy-demo-kafka-{prefix}y"]  # fmt: skip
    child = subprocess.Popen(
        [sys.executable, "-c", "import json, os, subprocess; "
         "subprocess.run(json.loads(os.environ['BROKER']))", "-m", "demo"],
        env={**os.environ, "BROKER": json.dumps(broker)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not _pids(f"kafka-{prefix}y"):
            assert time.monotonic() < deadline, "the live demo's broker did not start"
            time.sleep(0.05)
        while mine not in sweep_brokers(prefix):
            assert time.monotonic() < deadline, "the orphan was not adopted/stopped"
            time.sleep(0.1)
        while mine in _pids(f"kafka-{prefix}x"):  # SIGKILL is delivered, the exit takes a moment
            assert time.monotonic() < deadline, "the orphan did not exit"
            time.sleep(0.05)
        assert sweep_brokers(prefix) == [], "nothing else of this prefix is an orphan"
        assert _pids(f"kafka-{other}x") == [theirs] and child.poll() is None
        assert _pids(f"kafka-{prefix}y"), "the live demo's broker runs on"
    finally:
        for pid in [theirs, *_pids(f"kafka-{prefix}")]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        child.wait(10)


def _pids(text: str) -> list[int]:
    """Live (not zombie) processes with `text` in their command line."""
    return [pid for pid, argv in _live_cmdlines() if text.encode() in argv]
