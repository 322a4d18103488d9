"""connect() to a VIP while the writer changes services: every connection reaches one of that
service's backends, none fails and none lands on another service's (issue 16's churn race).

The programs are compiled with a fault injection (sock_lb.c reader_delay): each connect()
holds what it looked up for tens of microseconds, as a reader on a busy CPU does, so the
writer's changes land inside readers' windows in every run. The old writer rewrote a service's
entry and slots in place and deleted what left at once: with the same delay and the same number
of syncs (about 275 in 4 s), 22-64 connects of ~10,000 went to the other service or failed with
EPERM in each of 5 runs; the revision writer, 0 in 8 runs. Without the program's check that a
revision is its service's (a hash map element freed by an update is reused at once by the
next), 12-19 went to the other service: ordering alone does not do it (docs/services.md,
"Writes")."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from redirect_bpf.sock_lb import LbService, SockLB

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(120)]

SECONDS = 4.0
DELAY = 2048  # clock reads in each of a reader's two windows (sock_lb.c reader_delay)
VIP = "10.96.77.1"
CLIENT = """
import collections, json, socket, sys, time
end = time.monotonic() + float(sys.argv[1])
seen = collections.Counter()
while time.monotonic() < end:
    try:
        with socket.create_connection((sys.argv[2], 80), timeout=2) as s:
            seen[s.recv(1).decode() or "closed"] += 1
    except OSError as exc:
        seen[type(exc).__name__] += 1
print(json.dumps(seen))
"""


def _server(ip: str, port: int, tag: bytes) -> socket.socket:
    """Accepts and answers every connection with one byte naming its service."""
    srv = socket.create_server((ip, port), backlog=4096)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.sendall(tag)
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return srv


def test_connects_during_service_changes_reach_that_service_only():
    pin_dir = Path(f"/sys/fs/bpf/l7svc-churn-{uuid.uuid4().hex[:8]}")
    cgroup = Path(f"/sys/fs/cgroup/unified/l7svc-churn-{uuid.uuid4().hex[:8]}")
    cgroup.mkdir()
    servers: list[socket.socket] = []
    lb = client = None
    try:
        servers += [_server("127.0.0.1", 19301 + i, b"A") for i in range(4)]
        servers += [_server("127.0.0.2", 19401 + i, b"B") for i in range(4)]
        # every lookup held for tens of microseconds (fault injection, sock_lb.c): the
        # writer's changes land inside readers' windows in every run, not only on a loaded host
        lb = SockLB(pin_dir, cflags=[f"-DLB_TEST_READER_DELAY={DELAY}"])
        lb.attach(cgroup)
        a = [("127.0.0.1", 19301 + i) for i in range(4)]
        b = [("127.0.0.2", 19401 + i) for i in range(4)]

        def services(n: int) -> list[LbService]:
            # the drained backend is a middle one (the slots after it move); the other
            # services change in the same sync, after it
            mine = a if n % 2 == 0 else [a[0], a[2], a[3]]
            others = (b[:2], b[2:]) if n % 2 == 0 else (b, b[3:])
            return [
                LbService(VIP, 80, "TCP", tuple(mine)),
                LbService("10.96.77.2", 80, "TCP", tuple(others[0])),
                LbService("10.96.77.3", 80, "TCP", tuple(others[1])),
            ]

        lb.sync(services(0))
        client = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(SECONDS), VIP],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid())),
        )
        syncs = 0
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            syncs += 1
            lb.sync(services(syncs))
        seen = json.loads(client.communicate(timeout=30)[0])
        assert syncs > 50, syncs
        assert set(seen) == {"A"} and seen["A"] > 200, (seen, syncs)
    finally:
        if client is not None and client.poll() is None:
            client.kill()
            client.wait()
        if lb is not None:
            lb.destroy()
        shutil.rmtree(pin_dir, ignore_errors=True)  # also what a failed load left
        for srv in servers:
            srv.close()
        for _ in range(50):  # the client may still be leaving the cgroup
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)
