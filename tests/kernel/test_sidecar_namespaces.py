"""Sidecar mode across endpoint namespaces. 127.0.0.1 is in every endpoint's namespace, so two
endpoints whose clients use the same local port at the same time must still each get their own
original destination and source identity: the map's key holds the namespace cookie and the
sidecar's port besides the client's address. An entry leaves with its connection: read by the
proxy, refused by a closed sidecar, or read by SO_ORIGINAL_DST and then closed by the client."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from l7proxy import platform
from policies import EGRESS, PolicyEntry, PolicyKey
from tests.conftest import REPO
from tests.kernel.netns import in_netns
from tests.kernel.test_sidecar import cgroup

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(60)]

TCP = 6

# A client bound to a chosen local port (as two endpoints' clients can be by chance), then
# connected; "wait" reads the reply, "fire" sends and closes before anyone accepted.
CLIENT = """
import socket, sys
dest, port, local, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", local))
s.settimeout(5)
try:
    s.connect((dest, port))
except OSError as exc:
    print("refused" if isinstance(exc, ConnectionRefusedError) else repr(exc), flush=True)
    sys.exit(0)
print("connected", flush=True)
s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
if mode == "fire":
    s.close()
    sys.exit(0)
data = b""
while chunk := s.recv(4096):
    data += chunk
print(data.decode().split("\\r\\n\\r\\n", 1)[-1], flush=True)
"""

# A proxy that asks SO_ORIGINAL_DST (the getsockopt hook on its cgroup answers), with one
# listener per endpoint namespace; it accepts only once told every client has connected.
GETSOCKOPT_PROXY = """
import sys
from l7proxy.agent.sidecar_proxy import listen_in_netns
from l7proxy.platform import original_dst_nat
listeners = [listen_in_netns(ns) for ns in sys.argv[1:]]
print(" ".join(str(s.getsockname()[1]) for s in listeners), flush=True)
sys.stdin.readline()
for lst in listeners:
    lst.setblocking(True)
    conn, _ = lst.accept()
    conn.recv(4096)
    try:
        first, again = original_dst_nat(conn), original_dst_nat(conn)
        body = f"orig={first[0]}:{first[1]}" + ("" if again == first else f" then {again}")
    except OSError:
        body = "no-origin"
    conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body.encode()))
    conn.close()
"""


@dataclass
class Endpoint:
    netns: str
    cgroup: Path
    ep_id: int
    identity: int
    dest: str
    dest_id: int
    port: int  # the destination port its policy sends to L7

    def client(self, local_port: int, mode: str = "wait") -> subprocess.Popen:
        def enter():
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

        argv = [sys.executable, "-c", CLIENT, self.dest, str(self.port), str(local_port), mode]
        return subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv],
            preexec_fn=enter,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def attach(self, dp, sidecar_port: int) -> None:
        dp.attach_cgroup(self.cgroup, self.ep_id, self.identity, sidecar_port=sidecar_port)
        dp.sync_endpoint(
            self.ep_id,
            {PolicyKey(self.dest_id, EGRESS, TCP, self.port, 16): PolicyEntry(False, 7, ("t",))},
            ingress_enforced=False,
            egress_enforced=False,
            proxy_ports={7: sidecar_port},
        )

    def release(self, dp) -> None:
        dp.detach_cgroup(self.cgroup)
        dp.sync_endpoint(self.ep_id, {}, ingress_enforced=False, egress_enforced=False)


@contextlib.contextmanager
def two_endpoints(t):
    """Endpoints A and B in the topology's first two pod namespaces, each with its own cgroup,
    identity, destination and L7 port."""
    net = f"10.250.{t.spare_octet}"
    with cgroup() as cg_a, cgroup() as cg_b:
        a = Endpoint(t.pods[0].netns, cg_a, 221, 2021, f"{net}.11", 3011, 80)
        b = Endpoint(t.pods[1].netns, cg_b, 222, 2022, f"{net}.12", 3012, 8080)
        for ep in (a, b):
            t.dp.ipcache_upsert(f"{ep.dest}/32", ep.dest_id)
        try:
            yield a, b
        finally:
            for ep in (a, b):
                ep.release(t.dp)
                t.dp.ipcache_delete(f"{ep.dest}/32")


def connected(proc: subprocess.Popen) -> None:
    line = proc.stdout.readline().strip()
    assert line == "connected", (line, proc.stderr.read())


def output(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    return out.strip()


def cookie_of(netns: str) -> int:
    with in_netns(netns, socket.socket) as s:
        return platform.netns_cookie(s)


def entries_of(dp, *namespaces: str, wait: float = 2.0) -> list:
    """sidecar_by_addr keys of these namespaces, once the closing sockets' callbacks ran."""
    cookies = {cookie_of(ns) for ns in namespaces}
    deadline = time.monotonic() + wait
    while True:
        left = [k for k in dp.maps["sidecar_by_addr"].keys() if k.netns in cookies]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def test_same_client_port_in_two_namespaces_so_original_dst(clean):
    """Both clients connect from 127.0.0.1:<same port> before the proxy accepts either: each
    accepted connection still answers SO_ORIGINAL_DST with its own client's destination."""
    t = clean
    local = random.randint(40000, 49999)
    with two_endpoints(t) as (a, b), cgroup() as proxy_cg:
        t.dp.attach_proxy_cgroup(proxy_cg)

        def enter():
            (proxy_cg / "cgroup.procs").write_text(str(os.getpid()))

        proxy = subprocess.Popen(
            [sys.executable, "-c", GETSOCKOPT_PROXY, a.netns, b.netns],
            cwd=REPO,
            preexec_fn=enter,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            port_a, port_b = (int(p) for p in proxy.stdout.readline().split())
            a.attach(t.dp, port_a)
            b.attach(t.dp, port_b)
            client_a = a.client(local)
            connected(client_a)
            client_b = b.client(local)
            connected(client_b)
            proxy.stdin.write("accept\n")
            proxy.stdin.flush()
            assert output(client_a) == f"orig={a.dest}:{a.port}"
            assert output(client_b) == f"orig={b.dest}:{b.port}"
            # Read by the proxy, closed by the client: the entries are gone.
            assert entries_of(t.dp, a.netns, b.netns) == []
        finally:
            if proxy.poll() is None:
                proxy.kill()
            proxy.wait()
            t.dp.detach_proxy_cgroup(proxy_cg)


def test_same_client_port_in_two_namespaces_sidecar_map(clean):
    """The agent's way: the sidecar pops the entry by its accepted socket. Each endpoint gets its
    own destination and source identity; a refused connect and a client that sent and closed
    before the accept leave nothing behind that a later connection could pick up."""
    t = clean
    local = random.randint(40000, 49999)
    sidecar_map = platform.SidecarMap(t.dp.pin_dir)
    listeners = [in_netns(ns, socket.create_server, ("127.0.0.1", 0)) for ns in (
        t.pods[0].netns, t.pods[1].netns)]  # fmt: skip
    try:
        with two_endpoints(t) as (a, b):
            for ep, lst in zip((a, b), listeners, strict=True):
                ep.attach(t.dp, lst.getsockname()[1])
            client_a = a.client(local)
            connected(client_a)
            client_b = b.client(local)
            connected(client_b)
            for ep, lst, client in ((a, listeners[0], client_a), (b, listeners[1], client_b)):
                conn, peer = lst.accept()
                assert peer == ("127.0.0.1", local)
                with conn:
                    origin = sidecar_map.pop(conn)
                    assert origin == platform.SidecarOrigin(
                        ep.dest, ep.port, ep.identity, ep.dest_id
                    )
                    assert sidecar_map.pop(conn) is None  # one lookup per connection
                    conn.recv(4096)  # unread data would make close() send a reset
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                assert output(client) == "ok"
            assert entries_of(t.dp, a.netns, b.netns) == []

            # Sent and closed before the sidecar accepted: the entry waits for the sidecar.
            fire = a.client(local + 1, mode="fire")  # a fresh port: no TIME_WAIT to reuse
            connected(fire)
            output(fire)
            time.sleep(0.2)
            conn, _ = listeners[0].accept()
            with conn:
                assert sidecar_map.pop(conn).ip == a.dest
            assert entries_of(t.dp, a.netns) == []

            # The sidecar is gone: the refused connect's entry goes with its socket.
            listeners[0].close()
            assert output(a.client(local + 2)) == "refused"
            assert entries_of(t.dp, a.netns) == []
            assert not [k for k in t.dp.maps["sidecar_by_cookie"].keys()]
    finally:
        for lst in listeners:
            lst.close()
        sidecar_map.close()
