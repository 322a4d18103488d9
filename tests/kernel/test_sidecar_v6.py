"""Sidecar mode with a native IPv6 destination (issue 17): cgroup/connect6 checks it against
ipcache6 and the endpoint's egress policy, sends an L7 one to the sidecar (::ffff:127.0.0.1) with
the IPv6 original destination in the pinned map, and fails a denied one."""

from __future__ import annotations

import socket
import subprocess
import sys
import uuid

import pytest

from l7proxy import platform
from policies import EGRESS, PolicyEntry, PolicyKey
from tests.conftest import REPO, need_binary
from tests.kernel.netns import sh
from tests.kernel.test_sidecar import (
    INET6_CLIENT,
    TCP,
    cgroup,
    http_responder,
    popen_in,
    run_in,
)

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(60)]


def test_connect6_redirects_a_native_ipv6_destination_and_denies_by_policy(clean):
    t = clean
    curl = need_binary("curl")
    net = f"fd00:254:{uuid.uuid4().int % 0xFFFF:x}"
    dest, dest_id, ep_id, identity = f"{net}::7", 3101, 211, 2101
    sidecar_map = platform.SidecarMap(t.dp.pin_dir)

    def proxy_body(conn):
        origin = sidecar_map.pop(conn)
        if origin is None:
            return "no-origin"
        return f"orig=[{origin.ip}]:{origin.port} src={origin.source_identity}"

    proxy = socket.create_server(("127.0.0.1", 0))
    http_responder(proxy, proxy_body)
    sh("ip", "addr", "add", f"{dest}/128", "dev", "lo", "nodad")
    real = socket.create_server((dest, 80), family=socket.AF_INET6)
    http_responder(real, lambda conn: "real-server")
    try:
        with cgroup() as cg:
            t.dp.ipcache_upsert(f"{net}::/64", dest_id)
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
            try:
                got = run_in(cg, curl, "-6", "-s", "--max-time", "5", f"http://[{dest}]/")
                assert got.returncode == 0, got.stderr
                assert got.stdout == f"orig=[{dest}]:80 src={identity}"
                py = run_in(cg, sys.executable, "-c", INET6_CLIENT, dest, "80")
                assert py.stdout.strip() == f"orig=[{dest}]:80 src={identity}", py.stderr
                denied = run_in(cg, curl, "-6", "-s", "--max-time", "5", f"http://[{dest}]:81/")
                assert denied.returncode == 7  # connect() refused with EPERM
                # Outside the cgroup nothing is redirected.
                outside = subprocess.run(
                    [curl, "-6", "-s", "--max-time", "5", f"http://[{dest}]/"],
                    capture_output=True,
                    text=True,
                )
                assert outside.stdout == "real-server"
            finally:
                t.dp.detach_cgroup(cg)
                t.dp.ipcache_delete(f"{net}::/64")
    finally:
        real.close()
        proxy.close()
        sidecar_map.close()
        sh("ip", "addr", "del", f"{dest}/128", "dev", "lo", check=False)


GETSOCKOPT6_PROXY = """
import socket, struct
from l7proxy.platform import original_dst_nat6
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.recv(4096)
ip, port = original_dst_nat6(conn)  # IP6T_SO_ORIGINAL_DST, as behind ip6tables REDIRECT
# SOL_IP with room for any sockaddr (Envoy's sockaddr_storage) gets the sockaddr_in6 too
raw = conn.getsockopt(socket.SOL_IP, 80, 128)
family = struct.unpack_from("=H", raw)[0]
body = f"orig=[{ip}]:{port} sol_ip_family={family}".encode()
conn.sendall(b"HTTP/1.1 200 OK\\r\\nConnection: close\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
conn.close()
"""


def test_an_unmodified_proxy_asks_ip6t_so_original_dst(clean):
    """A native IPv6 destination redirected by connect6: the getsockopt hook on the proxy's
    cgroup answers IP6T_SO_ORIGINAL_DST (and SOL_IP given a sockaddr_storage) with it."""
    t = clean
    curl = need_binary("curl")
    net = f"fd00:253:{uuid.uuid4().int % 0xFFFF:x}"
    dest, dest_id, ep_id, identity = f"{net}::9", 3102, 212, 2102
    with cgroup() as app, cgroup() as proxy_cg:
        t.dp.attach_proxy_cgroup(proxy_cg)
        proxy = popen_in(proxy_cg, sys.executable, "-c", GETSOCKOPT6_PROXY, cwd=REPO)
        try:
            port = int(proxy.stdout.readline())
            t.dp.ipcache_upsert(f"{net}::/64", dest_id)
            t.dp.attach_cgroup(app, ep_id, identity, sidecar_port=port)
            t.dp.sync_endpoint(
                ep_id,
                {PolicyKey(dest_id, EGRESS, TCP, 8080, 16): PolicyEntry(False, 6, ("t",))},
                ingress_enforced=False,
                egress_enforced=False,
                proxy_ports={6: port},
            )
            got = run_in(app, curl, "-6", "-s", "--max-time", "5", f"http://[{dest}]:8080/x")
            assert got.returncode == 0, (got.stderr, proxy.stderr.read())
            assert got.stdout == f"orig=[{dest}]:8080 sol_ip_family={socket.AF_INET6}"
        finally:
            if proxy.poll() is None:
                proxy.kill()
            proxy.wait()
            t.dp.detach_cgroup(app)
            t.dp.detach_proxy_cgroup(proxy_cg)
            t.dp.ipcache_delete(f"{net}::/64")
            t.dp.sync_endpoint(ep_id, {}, ingress_enforced=False, egress_enforced=False)
