"""An agent restart under a running TCP stream: the first agent (a real process) loads, pins,
attaches and syncs, then exits; the kernel keeps enforcing; a second agent re-opens the pins,
its first sync is a no-op, and the stream never notices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from policies import INGRESS, PolicyEntry, PolicyKey
from redirect_bpf import bpfsys, loader
from tests.conftest import REPO
from tests.kernel.netns import BLOCKED, EchoServer, free_octets, pod, sock_in, tcp_ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(90)]

AGENT = """
import json, sys
from policies import PolicyEntry, PolicyKey
from redirect_bpf.datapath import Datapath
cfg = json.loads(sys.argv[1])
dp = Datapath(cfg["pin_dir"], node="restart")
for ifname, ep_id, identity, ip in cfg["endpoints"]:
    dp.attach_endpoint(ifname, ep_id, identity, ip)
dp.attach_cgroup(cfg["cgroup"], 21, 5021, sidecar_port=15999)
state = {PolicyKey(*k): PolicyEntry(False, 0, ("restart",)) for k in cfg["allow"]}
dp.sync_endpoint(cfg["target"], state, ingress_enforced=True, egress_enforced=False)
print("ready", dp.reused, flush=True)
sys.stdin.read()  # until the test lets it go; exiting closes every fd this agent had
"""


class Stream:
    """Sends numbered chunks and checks every echoed byte, on its own thread."""

    def __init__(self, netns, ip, port):
        self.sock = sock_in(netns)
        self.sock.settimeout(5)
        self.sock.connect((ip, port))
        self.sent = self.received = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        i = 0
        try:
            while not self.stop.is_set():
                chunk = f"{i:08d}".encode() * 128
                self.sock.sendall(chunk)
                self.sent += len(chunk)
                got = b""
                while len(got) < len(chunk):
                    got += self.sock.recv(len(chunk) - len(got))
                    if not got:
                        raise ConnectionError("closed")
                assert got == chunk
                self.received += len(got)
                i += 1
                time.sleep(0.002)
        except BaseException as e:
            self.error = e

    def progress(self, seconds: float) -> int:
        before = self.received
        time.sleep(seconds)
        return self.received - before

    def close(self):
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def test_agent_restart_keeps_enforcing_and_loses_no_connection():
    from redirect_bpf.datapath import Datapath

    pin_dir = f"/sys/fs/bpf/l7proxy/restart-{uuid.uuid4().hex[:8]}"
    o = free_octets(3)
    cg = Path("/sys/fs/cgroup/unified") / f"l7t-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    with pod(o[0]) as a, pod(o[1]) as b, pod(o[2]) as c:
        server = EchoServer(b.netns, b.pod_ip)
        cfg = {
            "pin_dir": pin_dir,
            "endpoints": [
                [a.host_if, 11, 5011, a.pod_ip],
                [b.host_if, 12, 5012, b.pod_ip],
                [c.host_if, 13, 5013, c.pod_ip],
            ],
            "allow": [[5011, INGRESS, 6, 0, 0]],
            "target": 12,
            "cgroup": str(cg),
        }
        agent = subprocess.Popen(
            [sys.executable, "-c", AGENT, json.dumps(cfg)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        dp = None
        stream = None
        try:
            assert agent.stdout.readline().split() == ["ready", "False"]
            stream = Stream(a.netns, b.pod_ip, server.port)
            assert stream.progress(0.3) > 0
            agent.stdin.close()  # first agent exits
            assert agent.wait(10) == 0
            # Nobody runs: the stream goes on and the policy still holds.
            assert stream.progress(0.5) > 0
            assert not tcp_ok(c.netns, b.pod_ip, server.port, timeout=BLOCKED)
            dp = Datapath(pin_dir, node="restart")  # second agent
            assert dp.reused
            for ifname, ep_id, identity, ip in cfg["endpoints"]:
                dp.attach_endpoint(ifname, ep_id, identity, ip)
            stats = dp.sync_endpoint(
                12,
                {PolicyKey(5011, INGRESS, 6, 0, 0): PolicyEntry(False, 0, ("restart",))},
                ingress_enforced=True,
                egress_enforced=False,
            )
            assert stats.touched == 0  # same policy: nothing written, no flow re-checked
            assert stream.progress(0.5) > 0
            stream.close()
            assert stream.error is None, stream.error
            assert stream.sent == stream.received > 0
            # The re-opened maps are the live ones: a change applies to new flows.
            dp.sync_endpoint(
                12,
                {PolicyKey(5013, INGRESS, 6, 0, 0): PolicyEntry(False, 0, ("restart",))},
                ingress_enforced=True,
                egress_enforced=False,
            )
            assert tcp_ok(c.netns, b.pod_ip, server.port)
            assert not tcp_ok(a.netns, b.pod_ip, server.port, timeout=BLOCKED)
        finally:
            if stream:
                stream.close()
            if agent.poll() is None:
                agent.kill()
                agent.wait()
            server.close()
            if dp is None:
                dp = Datapath(pin_dir, node="restart")
            dp.destroy()  # also finds the cgroup the first agent attached
            fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
            try:
                assert not bpfsys.attached_prog_ids(fd, loader.BPF_CGROUP_INET4_CONNECT)
                assert not bpfsys.attached_prog_ids(fd, loader.BPF_CGROUP_INET6_CONNECT)
                assert not bpfsys.attached_prog_ids(fd, loader.BPF_CGROUP_SOCK_OPS)
            finally:
                os.close(fd)
                cg.rmdir()
