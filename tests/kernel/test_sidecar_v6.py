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
from tests.conftest import need_binary
from tests.kernel.netns import sh
from tests.kernel.test_sidecar import INET6_CLIENT, TCP, cgroup, http_responder, run_in

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
