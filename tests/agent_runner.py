"""Test helper: run an agent as a child process with its own state, socket, pool and namespace
prefix.

The end-to-end tests, the agent benchmark and the demo use this: everything the agent creates is named with a unique
prefix, and `close()` removes it all (endpoints, namespaces, veths, the state directory) even when
the agent died or the run was interrupted.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from l7proxy.agent import netdev
from l7proxy.agent.client import SOCKET_ENV, AgentUnavailable, Client
from l7proxy.agent.proxy_worker_control import stop_worker

READY_TIMEOUT = 90.0  # bcc compiles the datapath at first start; slow on a loaded 2-core box


class AgentProcess:
    def __init__(
        self,
        *,
        pool: str,
        prefix: str | None = None,
        mode: str = "node",
        bpf: bool = False,
        admin: bool = True,
        state_dir: Path | None = None,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.prefix = prefix if prefix is not None else f"l7a{uuid.uuid4().hex[:5]}-"
        self._own_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix="l7proxy-agent-"))
        self.socket = str(self.state_dir / "agent.sock")
        self.pool, self.mode, self.bpf, self.admin = pool, mode, bpf, admin
        self.extra_args = extra_args
        self.pin_dir = Path("/sys/fs/bpf/l7proxy") / self.prefix.strip("-")
        self.log_path = self.state_dir / "agent.log"
        self.proc: subprocess.Popen | None = None
        self.client = Client(self.socket)

    @property
    def env(self) -> dict:
        return {**os.environ, SOCKET_ENV: self.socket}

    def start(self) -> AgentProcess:
        with contextlib.suppress(OSError):
            sweep_stale()
        args = [
            sys.executable,
            "-m",
            "l7proxy",
            "agent",
            "--state-dir",
            str(self.state_dir),
            "--socket",
            self.socket,
            "--pool",
            self.pool,
            "--netns-prefix",
            self.prefix,
            "--mode",
            self.mode,
            *(["--admin", "127.0.0.1:0"] if self.admin else []),
            *(["--bpf-dir", str(self.pin_dir)] if self.bpf else ["--no-bpf"]),
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the agent exited early:\n{self.log()}")
            with contextlib.suppress(AgentUnavailable, OSError):
                self.client.call("status")
                return self
            time.sleep(0.05)
        raise RuntimeError(f"the agent did not answer within {READY_TIMEOUT}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def cli(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "l7proxy", *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=check,
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop the process only: endpoints and state stay, as on a real agent restart."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> AgentProcess:
        self.stop()
        return self.start()

    def close(self) -> None:
        """Remove everything this agent made, whatever state it is in."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                quick = Client(self.socket, timeout=10)
                with contextlib.suppress(Exception):
                    for ep in quick.call("endpoint.list"):
                        quick.call("endpoint.delete", name=ep["name"])
            self.stop()
        finally:
            sweep_namespaces(self.prefix)  # the veths go, and their tc programs with them
            with contextlib.suppress(Exception):
                stop_worker(self.state_dir)  # --proxy-worker process outlives the agent
            if self.bpf:
                # Unpinned and detached, the programs and maps are freed by the kernel.
                shutil.rmtree(self.pin_dir, ignore_errors=True)
            if self._own_dir:
                shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def ok(agent: AgentProcess, *args: str) -> str:
    """`l7proxy <args>` against agent, asserted to succeed (its stderr and the agent's log in the
    message); its stdout."""
    r = agent.cli(*args)
    assert r.returncode == 0, f"l7proxy {' '.join(args)} failed: {r.stderr}\n{agent.log()}"
    return r.stdout


def client_egress_l7(port: int) -> str:
    """A CiliumNetworkPolicy: app=client may send only GET /public/.* to app=web on TCP port."""
    return f"""\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: client-egress}}
spec:
  endpointSelector: {{matchLabels: {{app: client}}}}
  egress:
    - toEndpoints:
        - matchLabels: {{app: web}}
      toPorts:
        - ports: [{{port: "{port}", protocol: TCP}}]
          rules:
            http:
              - method: GET
                path: /public/.*
"""


def sweep_namespaces(prefix: str) -> list[str]:
    """Delete every namespace named PREFIX* (and its host veth); returns what was removed."""
    if not prefix:
        raise ValueError("refusing to sweep namespaces without a prefix")
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(netdev.NETNS_DIR.iterdir()):
            if entry.name.startswith(prefix):
                netdev.delete(entry.name, netdev.host_ifname(entry.name))
                removed.append(entry.name)
    cgroups = netdev.AGENT_CGROUPS
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(cgroups.iterdir()):
            if entry.name.startswith(prefix):
                with contextlib.suppress(OSError):
                    entry.rmdir()
    return removed


def free_pool(low: int = 100, high: int = 249) -> str:
    """A 10.251.N.0/24 with no route on this host yet (parallel runs each get their own)."""
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    taken = {int(p.split(".")[2]) for p in routes.split() if p.startswith("10.251.")}
    free = [n for n in range(low, high + 1) if n not in taken]
    if not free:
        raise RuntimeError(f"no free 10.251.{low}-{high}.0/24 left")
    return f"10.251.{random.choice(free)}.0/24"


STALE_AFTER = 600.0  # seconds; an agent restart leaves its pins alone for a moment only


def sweep_stale(now: float | None = None, names: set[str] | None = None) -> list[str]:
    """Remove what runs of this runner left behind when they were killed outright (SIGKILL, a
    lost CI job): pin directories and namespaces named by its random prefixes, older than ten
    minutes, that no running agent uses."""
    now = time.time() if now is None else now
    cmdlines = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdlines.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
    mine = re.compile(r"^l7[ad][0-9a-f]{5}-?$")
    removed = []
    pins = Path("/sys/fs/bpf/l7proxy")
    with contextlib.suppress(FileNotFoundError):
        for entry in pins.iterdir():
            if names is not None and entry.name not in names:
                continue
            if not mine.match(entry.name) or now - entry.stat().st_mtime < STALE_AFTER:
                continue
            if any(f"--bpf-dir {entry}" in c or f"-prefix {entry.name}-" in c for c in cmdlines):
                continue
            sweep_namespaces(entry.name + "-")
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(str(entry))
    return removed


def free_pool6() -> str:
    """A /64 of fd00:10:<random>::/64 with no route on this host (parallel runs)."""
    routes = subprocess.run(["ip", "-6", "route"], capture_output=True, text=True).stdout
    while True:
        pool = f"fd00:10:{random.randrange(0x300, 0xFFFF):x}::"
        if pool not in routes:
            return pool + "/64"
