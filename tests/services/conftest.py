"""A node with services: an agent with BPF whose socket LB is attached to a cgroup of the test's
own (so nothing else on the machine is translated), three web backends and a client endpoint."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.agent_runner import AgentProcess, free_pool

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
BACKENDS = (("web1", "zone=a"), ("web2", "zone=a"), ("web3", "zone=b"))


class ServiceNode:
    def __init__(self) -> None:
        self.cgroup = CGROUP_ROOT / f"l7svc-{uuid.uuid4().hex[:8]}"
        self.cgroup.mkdir()
        self.agent = AgentProcess(
            pool=free_pool(), bpf=True, extra_args=("--sock-lb-cgroup", str(self.cgroup))
        )
        self.servers: dict[str, subprocess.Popen] = {}
        self.ips: dict[str, str] = {}

    def start(self) -> ServiceNode:
        self.agent.start()
        for name, zone in BACKENDS:
            self.add_backend(name, zone)
        self.ok("endpoint", "create", "client", "--labels", "app=client")
        self.ips["client"] = self.endpoint_ip("client")
        return self

    def add_backend(self, name: str, zone: str) -> None:
        self.ok("endpoint", "create", name, "--labels", f"app=web,{zone}")
        self.ips[name] = ip = self.endpoint_ip(name)
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.agent.prefix + name, sys.executable, "-m",
             "tests.services.backend_server", name, ip],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        assert proc.stdout.readline().strip() == "listening"
        self.servers[name] = proc

    def remove_backend(self, name: str) -> None:
        self.ok("endpoint", "delete", name)
        proc = self.servers.pop(name)
        proc.kill()
        proc.wait()

    def endpoint_ip(self, name: str) -> str:
        eps = json.loads(self.ok("endpoint", "list", "-o", "json"))
        return next(e["ip"] for e in eps if e["name"] == name)

    def ok(self, *args: str) -> str:
        r = self.agent.cli(*args)
        assert r.returncode == 0, f"l7proxy {' '.join(args)}: {r.stderr}\n{self.agent.log()}"
        return r.stdout

    def client(self, *args: str, endpoint: str = "client", cgroup: bool = True) -> list[dict]:
        """Run tests.services.client in an endpoint (and the LB's cgroup): its JSON lines."""
        join = str(self.cgroup / "cgroup.procs")

        def enter() -> None:
            if cgroup:
                Path(join).write_text(str(os.getpid()))

        r = subprocess.run(
            ["ip", "netns", "exec", self.agent.prefix + endpoint, sys.executable, "-m",
             "tests.services.client", *args],
            capture_output=True,
            text=True,
            preexec_fn=enter,
            timeout=120,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    def popen(self, module: str, *args: str, endpoint: str = "client") -> subprocess.Popen:
        """A long-running client module in an endpoint and the LB's cgroup, with pipes."""
        join = str(self.cgroup / "cgroup.procs")
        return subprocess.Popen(
            ["ip", "netns", "exec", self.agent.prefix + endpoint, sys.executable, "-m", module,
             *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: Path(join).write_text(str(os.getpid())),
        )  # fmt: skip

    def cli_popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "l7proxy", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.agent.env,
        )

    def stop_server(self, name: str) -> None:
        proc = self.servers.pop(name, None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        for proc in self.servers.values():
            proc.kill()
            proc.wait()
        try:
            self.agent.close()  # removing its pins unpins the LB's links: detached
        finally:
            for _ in range(50):  # the last client processes may still be leaving the cgroup
                with contextlib.suppress(FileNotFoundError):
                    try:
                        self.cgroup.rmdir()
                    except OSError:
                        time.sleep(0.1)
                        continue
                break


@pytest.fixture(scope="module")
def node():
    n = ServiceNode()
    try:
        yield n.start()
    finally:
        n.close()


def attached_programs(cgroup: Path) -> list[Path]:
    """Names of the programs attached to a cgroup for the socket LB's hooks (bpftool-free)."""
    from l7proxy.agent.kernel_cleanup import prog_fd_by_id, prog_name
    from redirect_bpf import bpfsys
    from redirect_bpf.sock_lb import ATTACH_TYPES

    names = []
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for kind in ATTACH_TYPES.values():
            for pid in bpfsys.attached_prog_ids(fd, kind):
                with contextlib.suppress(OSError):
                    pfd = prog_fd_by_id(pid)
                    try:
                        names.append(Path(prog_name(pfd).decode()))
                    finally:
                        os.close(pfd)
    finally:
        os.close(fd)
    return names
