"""The demo's cluster part (`python -m demo --cluster-only`; `make demo` ends with it): a SIGTERM
in the middle takes its lab down, and a lab left by a demo killed with SIGKILL is removed by the
next run, which then passes every check. tests/e2e/test_demo.py runs the whole `make demo`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need_binary
from tests.e2e.test_demo import DemoRun, lab_leftovers

pytestmark = [pytest.mark.root, pytest.mark.bpf]
REPO = Path(__file__).resolve().parent.parent.parent
ACROSS_NODES = "-> tiefighter: HTTP 200 Ship landed"  # the first check, node2 -> node1


@pytest.fixture
def no_lab():
    """No lab before the test (else the part would skip); none after it, also when it failed."""
    need_binary("etcd")
    assert lab_leftovers() == [], "a lab is up: `l7proxy lab down` first"
    yield
    if lab_leftovers():
        subprocess.run([sys.executable, "-m", "l7proxy", "lab", "down"], timeout=120, env=_env())


def _env() -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DEMO_WAIT", None)
    return env


@pytest.mark.timeout(200)
@pytest.mark.parametrize("when", ["during lab up", "with pods talking across nodes"])
def test_sigterm_during_the_cluster_part_takes_the_lab_down(no_lab, when):
    demo = DemoRun(_env(), subprocess.DEVNULL, "--cluster-only")
    try:
        if when == "during lab up":  # the demo lets `lab up` finish, then takes it down
            demo.read_until("$ l7proxy lab up")  # printed once it is sure to run whole
        else:
            demo.read_until(ACROSS_NODES)  # etcd, two agents, endpoints, a deathstar on node1
            assert Path("/var/run/netns/l7lab-node1-deathstar").exists(), demo.seen()
            assert any("demo.deathstar" in item for item in lab_leftovers()), demo.seen()
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.proc.wait(120) == 130, demo.seen()
    finally:
        demo.stop()
    out = demo.seen()
    assert "stopped agent node1; stopped agent node2; stopped etcd" in out, out
    if when == "during lab up":
        assert "interrupted: waiting for `l7proxy lab up` to finish first" in out, out
    assert lab_leftovers() == []


@pytest.mark.timeout(300)
def test_a_killed_demo_s_lab_is_removed_by_the_next_run(no_lab):
    killed = DemoRun(_env(), subprocess.DEVNULL, "--cluster-only")
    try:
        killed.read_until(ACROSS_NODES)
        killed.proc.kill()  # no cleanup at all: lab, agents, etcd and the deathstar stay
        killed.proc.wait(10)
    finally:
        killed.stop()
    left = lab_leftovers()
    assert "l7lab-node1" in left and any("demo.deathstar" in item for item in left), left

    r = subprocess.run(
        [sys.executable, "-m", "demo", "--cluster-only"],
        capture_output=True, text=True, env=_env(), timeout=240, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    out = r.stdout
    assert r.returncode == 0, out + r.stderr
    assert "a lab left by an earlier demo run (killed, or run with --keep)" in out
    assert out.count("$ l7proxy lab down") == 2  # the leftover, then its own
    assert "-> xwing: no answer within 2s (packets dropped)   [expected: dropped in the" in out
    assert "-> node1's kernel: " in out and "identity" in out
    assert "-> node1's proxy: PUT /v1/exhaust-port denied by node1's proxy" in out
    assert "-> cluster status: node1 on revision 2, node2 on revision 2" in out
    assert "10 checks, 0 unexpected" in out and "UNEXPECTED" not in out
    assert lab_leftovers() == []  # the first run's deathstar included
