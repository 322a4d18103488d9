"""A client port reused after a connection through the node proxy.

The node proxy's accepted socket lives in the host namespace with the original tuple, so when the
proxy closes first the host holds a TIME_WAIT socket for `deathstar:80 <-> tiefighter:port`.
Without the agent's reaper (l7proxy/agent/timewait.py) the next connection from that port
stalls 1 s when redirected again, and cannot connect at all for a minute when it is no longer
redirected (ip_forward drops a SYN that early demux matched to the TIME_WAIT socket). The
conntrack entry the first connection left (redirected, closing) must not decide the next one."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.agent_runner import ok
from tests.e2e.test_agent_bpf import L7, running_galaxy

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(120)]

CLIENT = """
import json, socket, sys, time
star, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.settimeout(4.0)
t = time.monotonic()
try:
    s.connect((star, 80))
except OSError as exc:
    print(json.dumps({"error": repr(exc), "connect_s": time.monotonic() - t}))
    sys.exit()
connected = time.monotonic() - t
s.sendall(b"POST /v1/request-landing HTTP/1.1\\r\\nHost: star\\r\\nContent-Length: 0\\r\\n"
          b"Connection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
s.close()
print(json.dumps({"status": int(data.split()[1]), "connect_s": connected}))
"""


@pytest.fixture(params=["inline", "process"])
def galaxy(request):
    with running_galaxy("--proxy-worker", request.param) as g:
        yield g


def connect_from(galaxy, port: int) -> dict:
    r = subprocess.run(
        ["ip", "netns", "exec", galaxy.agent.prefix + "tiefighter", sys.executable, "-c", CLIENT,
         galaxy.star, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def host_time_wait(galaxy, port: int) -> list[str]:
    """The host namespace's TIME_WAIT sockets for deathstar:80 <-> tiefighter:port."""
    r = subprocess.run(
        ["ss", "-Htn", "state", "time-wait", "src", f"{galaxy.star}:80", "dst",
         f"{galaxy.eps['tiefighter']['ip']}:{port}"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    return r.stdout.splitlines()


def reaped(galaxy) -> float:
    for line in ok(galaxy.agent, "metrics").splitlines():
        if line.startswith("l7proxy_proxy_timewait_reaped_total "):
            return float(line.split()[1])
    raise AssertionError("no l7proxy_proxy_timewait_reaped_total")


def wait_reaped(galaxy, port: int) -> None:
    deadline = time.monotonic() + 3.0
    while host_time_wait(galaxy, port):
        assert time.monotonic() < deadline, "the proxy's TIME_WAIT socket is still there after 3 s"
        time.sleep(0.05)


def test_a_port_reused_after_a_proxied_connection_connects_at_once(galaxy):
    agent = galaxy.agent
    ok(agent, "policy", "import", L7)
    port = 41234
    before = reaped(galaxy)
    for _ in range(3):  # redirected again from the same port: no 1 s SYN retry
        first = connect_from(galaxy, port)
        assert first["status"] == 200 and first["connect_s"] < 0.5, first
        wait_reaped(galaxy, port)
    assert reaped(galaxy) - before >= 3
    # Not redirected any more: the SYN is forwarded to the deathstar, where a host TIME_WAIT
    # socket would have it dropped, and the old (redirected, closing) conntrack entry must not
    # judge it either.
    ok(agent, "policy", "delete", "--all")
    direct = connect_from(galaxy, port)
    assert direct.get("status") == 200 and direct["connect_s"] < 0.5, direct
    flows = [
        json.loads(line)
        for line in ok(
            agent, "observe", "--verdict", "DROPPED", "-o", "json", "--last", "100"
        ).splitlines()
    ]
    assert not [f for f in flows if (f.get("l4") or {}).get("TCP", {}).get("source_port") == port]
