"""How the demo talks: steps, the commands it runs, and each verdict next to what was expected.

A verdict that differs from the expectation is marked UNEXPECTED and counted; `main` exits 1 on
any. `run_cli`, `curl` and `run_client` run real commands and print them first, so a reader can
repeat them.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from demo.procs import in_ns, module, shown

CURL_TIMEOUT = 2


@dataclass(frozen=True, slots=True)
class Outcome:
    text: str
    code: int | None = None  # HTTP status, None when nothing answered (or not HTTP)


class Story:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checks = 0

    def step(self, title: str) -> None:
        print(f"\n=== {title}", flush=True)

    def say(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def show(self, path: Path) -> None:
        """Print a file the next command uses (a policy)."""
        print(path.read_text().strip(), flush=True)

    def command(self, argv: list[str]) -> None:
        print(f"$ {shlex.join(argv)}", flush=True)

    def expect(self, who: str, seen: Outcome | str, want: str, ok: bool) -> None:
        if isinstance(seen, str):
            seen = Outcome(seen)
        self.checks += 1
        mark = "ok" if ok else "UNEXPECTED"
        print(f"    -> {who}: {seen.text}   [expected: {want}: {mark}]", flush=True)
        if not ok:
            self.failures.append(f"{who}: saw {seen.text!r}, expected {want}")

    def fail(self, what: str) -> None:
        """A part that could not run at all counts as unexpected."""
        self.failures.append(what)
        print(f"    UNEXPECTED: {what}", flush=True)


def run_cli(
    story: Story, env: dict | None, *args: str, show: bool = True
) -> subprocess.CompletedProcess:
    """`l7proxy ARGS` as a user types it; a failing command stops the demo (RuntimeError)."""
    story.command(["l7proxy", *args])
    r = subprocess.run(
        [sys.executable, "-m", "l7proxy", *args], capture_output=True, text=True, env=env
    )
    out = (r.stdout + r.stderr).rstrip()
    if show and out:
        print(out, flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"l7proxy {' '.join(args)} failed (exit {r.returncode}): {out}")
    return r


def curl(story: Story, prefix: list[str], method: str, url: str, extra=()) -> Outcome:
    """curl, run after `prefix` (`ip netns exec NS`, `l7proxy --node N endpoint exec EP --` or
    nothing); what answered, or why nothing."""
    argv = [*prefix, "curl", "-s", "-m", str(CURL_TIMEOUT), "-X", method, *extra, url]
    story.command(shown(argv))
    with tempfile.NamedTemporaryFile() as body:
        r = subprocess.run(
            [*argv, "-o", body.name, "-w", "%{http_code}"], capture_output=True, text=True
        )
        text = Path(body.name).read_text(errors="replace").strip()
    if r.returncode == 28:
        return Outcome(f"no answer within {CURL_TIMEOUT}s (packets dropped)")
    if r.returncode in (7, 52, 56):
        return Outcome(f"connection refused or reset (curl exit {r.returncode})")
    if r.returncode != 0:
        return Outcome(f"curl failed (exit {r.returncode}): {r.stderr.strip()}")
    code = int(r.stdout or 0)
    if text:
        print(text, flush=True)
    return Outcome(f"HTTP {code} {text}", code)


def run_client(story: Story, args: list[str], netns: str | None = None) -> tuple[str, int]:
    """`python -m demo.clients ARGS` (in `netns` when given): the line it printed, its exit code."""
    argv = module("clients", *args)
    if netns:
        argv = in_ns(netns, argv)
    story.command(shown(argv))
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no result within 30 s", -1
    return r.stdout.strip(), r.returncode
