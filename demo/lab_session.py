"""The lab of the cluster part: `l7proxy lab up` at its start and `l7proxy lab down` at its end,
also on Ctrl-C, SIGTERM or an error.

A lab's names are fixed (`l7lab-*`, the lab directory), so a machine has one lab at a time. The
demo marks the lab it brings up with its own pid (`demo.pid` in the lab directory, pid and start
time like the lab's pidfiles). A lab left by a demo that was killed outright (SIGKILL) is removed
by the next run; a lab someone brought up by hand, or one that another running demo uses, is left
alone and the cluster part says why it does not run. `lab down` also stops what still runs in
the lab's namespaces, so the servers the demo starts in lab endpoints go with it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from demo.procs import Children, deferred_interrupts, shown, uninterrupted
from demo.story import Story
from l7proxy.lab import pidfile, processes, state, underlay

OWNER_FILE = "demo.pid"


@dataclass
class ClusterRun:
    """What the cluster part started inside the lab, and the endpoints' addresses and ids."""

    children: Children = field(default_factory=Children)
    ips: dict[str, str] = field(default_factory=dict)
    identities: dict[str, int] = field(default_factory=dict)


def _owner() -> Path:
    return state.lab_dir() / OWNER_FILE


def _lab_present() -> bool:
    """A lab's state file or any of its namespaces (what `lab up` refuses to start over)."""
    return state.LabState.load() is not None or bool(underlay.leftover_namespaces())


def lab_cli(story: Story, *args: str) -> subprocess.CompletedProcess:
    """`l7proxy lab ARGS`, printed with its output. It runs in its own session, so a Ctrl-C in
    the terminal does not cut `lab up` (or `lab down`) half-way: an interruption waits for it to
    end, then goes on unwinding (and `lab down` removes whatever `lab up` made)."""
    argv = [sys.executable, "-m", "l7proxy", "lab", *args]
    with deferred_interrupts() as held:  # from the moment the command shows, it runs whole
        story.command(shown(argv))
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    try:
        if held:
            raise KeyboardInterrupt
        out, _ = proc.communicate()
    except KeyboardInterrupt:
        story.say(f"interrupted: waiting for `l7proxy lab {args[0]}` to finish first")
        with uninterrupted():
            out, _ = proc.communicate()
        raise
    if out.strip():
        print(out.rstrip(), flush=True)
    return subprocess.CompletedProcess(argv, proc.returncode, out, "")


def blocker(story: Story) -> str | None:
    """Why the cluster part cannot run here, or None. A lab that a killed demo left is removed."""
    try:
        processes.etcd_binary()
    except FileNotFoundError as exc:
        return str(exc)
    if not _lab_present():
        return None
    if pid := pidfile.alive(_owner()):
        return f"another demo (pid {pid}) is running its cluster part"
    if not _owner().exists():
        return (
            "a lab is up (see `l7proxy lab status`), and the demo leaves it alone: run "
            "`l7proxy lab down` first, or the demo with --no-cluster"
        )
    story.say("a lab left by an earlier demo run (killed, or run with --keep): removing it")
    with uninterrupted():
        lab_cli(story, "down")  # also stops the killed run's servers in the lab's namespaces
    return None


def _show_logs(story: Story) -> None:
    """Something was unexpected: the end of each node agent's log, before `lab down` removes it."""
    for log in sorted(state.lab_dir().glob("node*/agent.log")):
        story.step(f"Something was unexpected: {log.parent.name}'s agent log ends with")
        print(processes.tail(log, 15), flush=True)


@contextlib.contextmanager
def session(story: Story, nodes: int, routing: str, keep: bool) -> Iterator[ClusterRun]:
    """A lab of `nodes` nodes for the cluster part; on the way out (also on Ctrl-C/SIGTERM or an
    error) the demo's processes in it stop and `lab down` removes all of it, unless `keep`."""
    run = ClusterRun()
    kept, failures = False, len(story.failures)
    state.lab_dir().mkdir(parents=True, exist_ok=True)
    pidfile.write(_owner(), os.getpid())  # before `lab up`: whatever it makes is this run's
    try:
        up = lab_cli(story, "up", "--nodes", str(nodes), "--routing", routing)
        if up.returncode != 0:
            raise RuntimeError(f"l7proxy lab up failed (exit {up.returncode})")
        yield run
        if keep:
            story.say("--keep: the lab stays up; `l7proxy lab down` removes it")
            run.children.forget()
            kept = True
    finally:
        run.children.close()
        if len(story.failures) > failures:
            _show_logs(story)
        if not kept:
            story.step("Clean up the cluster: `lab down` stops the agents and etcd, removes it all")
            with uninterrupted():
                down = lab_cli(story, "down")
            if down.returncode != 0:
                story.fail(f"l7proxy lab down failed (exit {down.returncode})")
