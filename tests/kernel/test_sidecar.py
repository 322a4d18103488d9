"""Sidecar mode: cgroup/connect4 + sock_ops send an unmodified curl in a test cgroup to the
sidecar proxy, which reads the original destination from the pinned map; the proxy's own
(marked) sockets and other ports are left alone; a denied connect() fails."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from l7proxy import platform
from policies import EGRESS, PolicyEntry, PolicyKey
from tests.conftest import REPO, need_binary
from tests.kernel.conftest import host_addresses

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(60)]

CGROUP_ROOT = Path("/sys/fs/cgroup/unified")
TCP = 6


def http_responder(sock: socket.socket, body_of):
    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(4096)
                    body = body_of(conn).encode()
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: "
                        + str(len(body)).encode()
                        + b"\r\n\r\n"
                        + body
                    )

    threading.Thread(target=serve, daemon=True).start()


@contextlib.contextmanager
def cgroup():
    path = CGROUP_ROOT / f"l7t-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


def run_in(cg: Path, *argv: str, timeout: float = 10) -> subprocess.CompletedProcess:
    def enter():
        (cg / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.run(argv, preexec_fn=enter, capture_output=True, text=True, timeout=timeout)


def popen_in(cg: Path, *argv: str, **kw) -> subprocess.Popen:
    """A process started inside the cgroup `cg` (its hooks apply from its first syscall), its
    stdout and stderr piped as text."""

    def enter():
        (cg / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.Popen(
        argv, preexec_fn=enter, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


MARKED_CLIENT = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, int(sys.argv[3]))
s.settimeout(3)
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
print(s.recv(4096).decode().split("\\r\\n\\r\\n", 1)[1])
"""


# An AF_INET6 client: a v4-mapped destination here, a native IPv6 one in test_sidecar_v6.py.
INET6_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET6)
s.settimeout(5)
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
print(s.recv(4096).decode().split("\\r\\n\\r\\n", 1)[1])
"""


def test_sidecar_redirects_unmodified_curl_and_spares_the_proxy(clean):
    t = clean
    curl = need_binary("curl")
    net = f"10.250.{t.spare_octet}"
    dest, dest_id, ep_id, identity = f"{net}.7", 3001, 201, 2001
    origins = []
    sidecar_map = platform.SidecarMap(t.dp.pin_dir)

    def proxy_body(conn):
        origin = sidecar_map.pop(conn)
        origins.append(origin)
        if origin is None:
            return "no-origin"
        return f"orig={origin.ip}:{origin.port} src={origin.source_identity}"

    proxy = socket.create_server(("127.0.0.1", 0))
    http_responder(proxy, proxy_body)
    real = None
    with host_addresses(f"{dest}/32"), cgroup() as cg:
        try:
            real = socket.create_server((dest, 80))
            http_responder(real, lambda conn: "real-server")
            t.dp.ipcache_upsert(f"{net}.0/24", dest_id)
            t.dp.attach_cgroup(cg, ep_id, identity, sidecar_port=proxy.getsockname()[1])
            t.dp.sync_endpoint(
                ep_id,
                {
                    PolicyKey(dest_id, EGRESS, TCP, 80, 16): PolicyEntry(False, 5, ("t",)),
                    PolicyKey(dest_id, EGRESS, TCP, 81, 16): PolicyEntry(True, 0, ("t",)),
                },
                ingress_enforced=False,
                egress_enforced=False,
                proxy_ports={5: proxy.getsockname()[1]},
            )
            got = run_in(cg, curl, "-s", "--max-time", "5", f"http://{dest}/")
            assert got.returncode == 0, got.stderr
            assert got.stdout == f"orig={dest}:80 src={identity}"
            # The map entry was consumed by the proxy (one lookup per connection).
            assert not list(t.dp.maps["sidecar_by_addr"].keys())
            # The proxy's own upstream sockets (marked) go where they asked.
            mark = str(platform.proxy_mark(identity))
            marked = run_in(cg, sys.executable, "-c", MARKED_CLIENT, dest, "80", mark)
            assert marked.stdout.strip() == "real-server", marked.stderr
            # The same curl outside the cgroup is not redirected.
            outside = subprocess.run(
                [curl, "-s", "--max-time", "5", f"http://{dest}/"], capture_output=True, text=True
            )
            assert outside.stdout == "real-server"
            # A denied destination port: connect() fails (EPERM), curl exits 7.
            denied = run_in(cg, curl, "-s", "--max-time", "5", f"http://{dest}:81/")
            assert denied.returncode == 7
            # An AF_INET6 socket to the IPv4-mapped address goes the same way (connect6).
            mapped = run_in(cg, sys.executable, "-c", INET6_CLIENT, f"::ffff:{dest}", "80")
            assert mapped.stdout.strip() == f"orig={dest}:80 src={identity}", mapped.stderr
            # Attaching again (as a restarted agent does) is idempotent; detaching detaches.
            t.dp.attach_cgroup(cg, ep_id, identity, sidecar_port=proxy.getsockname()[1])
            t.dp.detach_cgroup(cg)
            after = run_in(cg, curl, "-s", "--max-time", "5", f"http://{dest}/")
            assert after.stdout == "real-server"
        finally:
            t.dp.detach_cgroup(cg)
            t.dp.ipcache_delete(f"{net}.0/24")
            t.dp.sync_endpoint(ep_id, {}, ingress_enforced=False, egress_enforced=False)
            proxy.close()
            if real:
                real.close()
            sidecar_map.close()
    assert len(origins) == 2


GETSOCKOPT_PROXY = """
import socket
from l7proxy.platform import original_dst_nat
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.recv(4096)
ip, port = original_dst_nat(conn)  # getsockopt SO_ORIGINAL_DST, as behind iptables REDIRECT
body = f"orig={ip}:{port}".encode()
conn.sendall(b"HTTP/1.1 200 OK\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
conn.close()
"""


def test_sidecar_proxy_asks_so_original_dst_unmodified(clean):
    t = clean
    curl = need_binary("curl")
    net = f"10.250.{t.spare_octet}"
    dest, dest_id, ep_id, identity = f"{net}.9", 3002, 202, 2002
    with cgroup() as app, cgroup() as proxy_cg:
        t.dp.attach_proxy_cgroup(proxy_cg)
        proxy = popen_in(proxy_cg, sys.executable, "-c", GETSOCKOPT_PROXY, cwd=REPO)
        try:
            port = int(proxy.stdout.readline())
            t.dp.ipcache_upsert(f"{net}.0/24", dest_id)
            t.dp.attach_cgroup(app, ep_id, identity, sidecar_port=port)
            t.dp.sync_endpoint(
                ep_id,
                {PolicyKey(dest_id, EGRESS, TCP, 8080, 16): PolicyEntry(False, 6, ("t",))},
                ingress_enforced=False,
                egress_enforced=False,
                proxy_ports={6: port},
            )
            got = run_in(app, curl, "-s", "--max-time", "5", f"http://{dest}:8080/x")
            assert got.returncode == 0, (got.stderr, proxy.stderr.read())
            assert got.stdout == f"orig={dest}:8080"
        finally:
            if proxy.poll() is None:
                proxy.kill()
            proxy.wait()
            t.dp.detach_cgroup(app)
            t.dp.detach_proxy_cgroup(proxy_cg)
            t.dp.ipcache_delete(f"{net}.0/24")
            t.dp.sync_endpoint(ep_id, {}, ingress_enforced=False, egress_enforced=False)
