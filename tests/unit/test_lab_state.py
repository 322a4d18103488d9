"""The lab's bookkeeping without a lab: its state file, `--node` resolution, pidfiles, and the
arguments `lab up` refuses before it touches anything."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from l7proxy import cli
from l7proxy.lab import lifecycle, pidfile, state


@pytest.fixture
def lab_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(state.LAB_DIR_ENV, str(tmp_path))
    monkeypatch.delenv("L7PROXY_SOCKET", raising=False)
    monkeypatch.delenv("L7PROXY_KVSTORE", raising=False)
    return tmp_path


def _lab(tmp_path) -> state.LabState:
    node = state.NodeState("node1", "l7lab-node1", "10.251.0.11", "l7lab-h1", str(tmp_path),
                           str(tmp_path / "agent.sock"), "/sys/fs/bpf/l7proxy/lab-node1")  # fmt: skip
    return state.LabState("tunnel", "10.252.0.0/16", "etcd://10.251.0.1:2379", [], 10,
                          {"node1": node})  # fmt: skip


def test_state_round_trips_and_node_selects_its_socket(lab_dir):
    _lab(lab_dir).save()
    loaded = state.LabState.load()
    assert loaded.nodes["node1"].underlay_ip == "10.251.0.11"
    state.select_node("node1")
    assert os.environ["L7PROXY_SOCKET"] == str(lab_dir / "agent.sock")
    assert os.environ["L7PROXY_KVSTORE"] == "etcd://10.251.0.1:2379"
    with pytest.raises(LookupError, match=r"no node 'node7' in the lab \(nodes: node1\)"):
        state.select_node("node7")


def test_node_without_a_lab_is_a_one_line_error(lab_dir, capsys):
    assert cli.main(["--node", "node1", "status"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "run `l7proxy lab up --nodes N` first" in err


def test_pidfile_never_names_a_process_that_is_not_the_recorded_one(tmp_path):
    path = tmp_path / "p.pid"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        pidfile.write(path, child.pid)
        assert pidfile.alive(path) == child.pid
        path.write_text(f"{child.pid} 1\n")  # the same pid, another start time: pid reuse
        assert pidfile.alive(path) is None
        pidfile.write(path, child.pid)
        assert pidfile.stop(path, timeout=5)
        assert child.wait(5) is not None and not path.exists()
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("nodes", "routing", "message"),
    [
        (0, "tunnel", "--nodes 0: give 1 to"),
        (3, "vxlan", "--routing 'vxlan': give tunnel or native"),
    ],
)
def test_lab_up_refuses_bad_arguments_before_anything(lab_dir, nodes, routing, message):
    with pytest.raises(ValueError, match=message):
        lifecycle.up(nodes, routing)
    assert not (lab_dir / "lab.json").exists()
