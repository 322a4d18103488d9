"""`l7proxy uninstall` without the kernel: which processes are agents, which directories are our
pins, the refusal while an agent runs, the report. The kernel side (a real agent killed with
SIGKILL, then uninstall) is tests/e2e/test_agent_uninstall.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from l7proxy.agent import kernel_cleanup
from l7proxy.agent.kernel_cleanup import (
    DEFAULT_PIN_DIR,
    Report,
    agent_args,
    agent_pin_dir,
    pin_dirs,
)
from l7proxy.cli import main


def test_agent_command_lines_and_their_pin_dirs():
    py = "/work/main/.venv/bin/python"

    def pin_dir(argv):
        args = agent_args(argv)
        assert args is not None, f"not seen as an agent: {argv}"
        return agent_pin_dir(args)

    assert pin_dir([py, "-m", "l7proxy", "agent", "--pool", "10.1.0.0/16"]) == DEFAULT_PIN_DIR
    assert pin_dir(["/usr/local/bin/l7proxy", "agent", "--bpf-dir", "/sys/fs/bpf/x/"]) == Path(
        "/sys/fs/bpf/x"
    )
    assert pin_dir([py, "-m", "l7proxy", "agent", "--bpf-dir=/sys/fs/bpf/y"]) == Path(
        "/sys/fs/bpf/y"
    )
    assert pin_dir([py, "-m", "l7proxy", "agent", "--no-bpf"]) is None  # an agent, nothing pinned
    assert agent_args([py, "-m", "l7proxy", "uninstall"]) is None
    assert agent_args([py, "-m", "l7proxy.agent.proxy_worker_process", "--fd", "3"]) is None
    assert agent_args(["vim", "l7proxy", "agent.md"]) is None


def test_running_agents_scoped_to_a_pin_dir(monkeypatch):
    py = "python3"
    monkeypatch.setattr(
        kernel_cleanup,
        "_cmdlines",
        lambda: {
            10: [py, "-m", "l7proxy", "agent", "--bpf-dir", "/sys/fs/bpf/l7proxy/a"],
            11: [py, "-m", "l7proxy", "agent", "--no-bpf"],
            12: [py, "-m", "l7proxy", "status"],
        },
    )
    assert kernel_cleanup.running_agents() == {10: Path("/sys/fs/bpf/l7proxy/a"), 11: None}
    assert kernel_cleanup.running_agents(Path("/sys/fs/bpf/l7proxy/a/")) == {
        10: Path("/sys/fs/bpf/l7proxy/a")
    }
    assert kernel_cleanup.running_agents(Path("/sys/fs/bpf/l7proxy/b")) == {}


def test_pin_directories_are_recognised_by_their_contents(tmp_path):
    ours = tmp_path / "l7proxy" / "node1"
    ours.mkdir(parents=True)
    for name in ("map_policy_allow", "map_events", "prog_from_endpoint"):
        (ours / name).touch()
    half = tmp_path / "l7proxy" / "crashed"  # a half-written set is ours too
    half.mkdir()
    (half / "map_conntrack").touch()
    mixed = tmp_path / "other"  # someone else's pins next to a name like ours: not ours
    mixed.mkdir()
    (mixed / "map_config").touch()
    (mixed / "their_map").touch()
    (tmp_path / "l7proxy" / "empty").mkdir()
    assert pin_dirs(tmp_path) == [half, ours]


def test_uninstall_refuses_while_an_agent_runs(monkeypatch, capsys):
    monkeypatch.setattr(
        kernel_cleanup, "running_agents", lambda pin_dir=None: {4242: DEFAULT_PIN_DIR}
    )

    def must_not_run(*args, **kwargs):
        raise AssertionError("uninstall went on while an agent runs")

    monkeypatch.setattr(kernel_cleanup, "uninstall", must_not_run)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert main(["uninstall"]) == 1
    err = capsys.readouterr().err
    assert "an l7proxy agent is running: pid 4242" in err and "--force" in err


def test_uninstall_with_force_goes_on_and_prints_what_it_removed(monkeypatch, capsys):
    monkeypatch.setattr(
        kernel_cleanup, "running_agents", lambda pin_dir=None: {4242: DEFAULT_PIN_DIR}
    )
    calls = []

    def fake(pin_dir=None, state_dir=None):
        calls.append((pin_dir, state_dir))
        return Report(removed=["pins /sys/fs/bpf/l7proxy/default (12 maps, 6 programs)"])

    monkeypatch.setattr(kernel_cleanup, "uninstall", fake)
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert main(["uninstall", "--force", "--bpf-dir", "/sys/fs/bpf/l7proxy/default/"]) == 0
    out = capsys.readouterr().out
    assert "warning: agent pid 4242 still runs (/sys/fs/bpf/l7proxy/default)" in out
    assert "removed pins /sys/fs/bpf/l7proxy/default (12 maps, 6 programs)" in out
    assert calls == [(Path("/sys/fs/bpf/l7proxy/default"), None)]


def test_nothing_found_says_so(monkeypatch, capsys):
    monkeypatch.setattr(kernel_cleanup, "running_agents", lambda pin_dir=None: {})
    monkeypatch.setattr(kernel_cleanup, "uninstall", lambda pin_dir=None, state_dir=None: Report())
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert main(["uninstall"]) == 0
    assert capsys.readouterr().out == "nothing to remove\n"


@pytest.mark.parametrize("argv", [["uninstall", "--bpf-dir", "node1"]])
def test_relative_bpf_dir_is_refused(capsys, argv):
    assert main(argv) == 2
    assert "is relative" in capsys.readouterr().err
