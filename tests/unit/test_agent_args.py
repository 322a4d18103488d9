"""`l7proxy agent` rejects bad arguments with one line that says what to do (exit 2, like
argparse), before anything is created or attached. A relative `--bpf-dir NAME` used to end in a
PermissionError traceback from the pin call, after the agent had started."""

from __future__ import annotations

from pathlib import Path

import pytest

from l7proxy.agent import daemon
from l7proxy.cli import build_parser, main
from l7proxy.commands.agent import argument_problem, fs_type

MOUNTS = """sysfs /sys sysfs rw,nosuid,nodev,noexec,relatime 0 0
bpf /sys/fs/bpf bpf rw,nosuid,nodev,noexec,relatime,mode=700 0 0
tmpfs /tmp tmpfs rw,nosuid,nodev 0 0
/dev/vda1 / ext4 rw,relatime 0 0
"""


def build_args(argv: list[str]):
    return build_parser().parse_args(["agent", *argv])


@pytest.fixture
def no_agent(monkeypatch):
    """Fail the test if the command got as far as building an agent."""

    def refuse(*args, **kwargs):
        raise AssertionError("the agent was started despite bad arguments")

    monkeypatch.setattr(daemon, "Agent", refuse)


def run_agent(capsys, *argv: str) -> tuple[int, str]:
    code = main(["agent", *argv])
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ("--bpf-dir", "mynode"),
            "is relative: give a directory on the BPF filesystem, e.g. /sys/fs/bpf/l7proxy/mynode",
        ),
        (("--bpf-dir", "l7/x"), "e.g. /sys/fs/bpf/l7proxy/x"),
        (("--pool", "10.200.0.0/31"), "--pool '10.200.0.0/31'"),
        (("--pool", "banana"), "e.g. --pool 10.200.0.0/16"),
        (("--admin", "127.0.0.1:http"), "give HOST:PORT with a port 0-65535"),
        (("--admin", "127.0.0.1:70000"), "give HOST:PORT with a port 0-65535"),
        (("--netns-prefix", "a/b"), "a namespace name cannot hold '/'"),
        (("--socket", "/tmp/" + "s" * 120), "a unix socket path is at most 107 bytes"),
    ],
)
def test_bad_agent_arguments_get_one_line_and_exit_2(capsys, no_agent, tmp_path, argv, says):
    code, err = run_agent(capsys, "--state-dir", str(tmp_path / "state"), *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("l7proxy agent: error: "), err
    assert says in err
    assert "Traceback" not in err
    assert not (tmp_path / "state").exists()  # nothing was created


def test_state_dir_that_is_a_file_is_refused(capsys, no_agent, tmp_path):
    state = tmp_path / "state"
    state.write_text("not a directory")
    code, err = run_agent(capsys, "--state-dir", str(state))
    assert code == 2 and "is a file: give a directory" in err


def test_bpf_dir_on_another_filesystem_is_refused(capsys, no_agent, tmp_path):
    assert fs_type(tmp_path) != "bpf"
    code, err = run_agent(
        capsys, "--state-dir", str(tmp_path / "s"), "--bpf-dir", str(tmp_path / "pins")
    )
    assert code == 2
    assert "not the BPF filesystem" in err and "mount -t bpf bpf /sys/fs/bpf" in err


def test_bpf_dir_checks_against_the_mount_table():
    assert fs_type(Path("/sys/fs/bpf/l7proxy/n1"), MOUNTS) == "bpf"
    assert fs_type(Path("/sys/fs/bpfx"), MOUNTS) == "sysfs"
    assert fs_type(Path("/var/lib"), MOUNTS) == "ext4"
    good = build_args(["--bpf-dir", "/sys/fs/bpf/l7proxy/n1", "--admin", "127.0.0.1:0"])
    assert argument_problem(good, MOUNTS) is None
    elsewhere = build_args(["--bpf-dir", "/tmp/pins"])
    assert "on a tmpfs filesystem" in argument_problem(elsewhere, MOUNTS)
    # with BPF off the pin directory is never used, so it is not checked
    assert argument_problem(build_args(["--no-bpf", "--bpf-dir", "rel"]), MOUNTS) is None


def test_default_arguments_pass():
    assert argument_problem(build_args([]), MOUNTS) is None
