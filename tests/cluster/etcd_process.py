"""Test helper: a real etcd (Debian's etcd-server) on loopback with free ports and a data
directory of its own; `stop()`/`start()` keep the data, like an etcd outage and its return."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

READY_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdProcess:
    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.data_dir = Path(tempfile.mkdtemp(prefix="l7proxy-etcd-"))
        self.port, self.peer_port = free_port(), free_port()
        self.url = f"etcd://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> EtcdProcess:
        log = open(self.data_dir / "etcd.log", "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--name", "test",
                "--data-dir", str(self.data_dir / "data"),
                "--listen-client-urls", f"http://127.0.0.1:{self.port}",
                "--advertise-client-urls", f"http://127.0.0.1:{self.port}",
                "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited: {self.log()}")
            if self._healthy():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"etcd did not listen within {READY_TIMEOUT}s: {self.log()}")

    def _healthy(self) -> bool:
        """etcd answers /health with true once it has a leader (listening comes earlier)."""
        url = f"http://127.0.0.1:{self.port}/health"
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url, timeout=0.5) as reply:
                return json.loads(reply.read()).get("health") == "true"
        return False

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.data_dir / "etcd.log").read_text(errors="replace")[-3000:]
        return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
