"""DNS in sidecar mode from inside the endpoint's cgroup (root, real kernel, real dnsmasq): a
process started with `l7proxy endpoint exec` meets the cgroup connect4 hook first, so DNS over
TCP must still reach the DNS proxy (allowed names answered, others REFUSED), and DNS over UDP
(not seen by connect4) goes through the tc programs as in node mode."""

from __future__ import annotations

import shutil

import pytest

from tests.agent_runner import AgentProcess, free_pool
from tests.e2e.dns_lab import dns_lab
from tests.e2e.test_agent_dns import POLICY, Outside

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def lab():
    assert shutil.which("dnsmasq") and shutil.which("dig"), "make setup installs dnsmasq and dig"
    agent = AgentProcess(pool=free_pool(), bpf=True, mode="sidecar")
    with dns_lab(agent, Outside, POLICY) as outside:
        yield agent, outside


def dig_in_cgroup(agent, outside, name: str, *extra: str) -> tuple[str, list[str]]:
    r = agent.cli(
        "endpoint", "exec", "client", "--",
        "dig", f"@{outside.addr(53)}", "+time=2", "+tries=1", name, *extra,
    )  # fmt: skip
    status = next((ln.split("status: ")[1].split(",")[0] for ln in r.stdout.splitlines()
                   if "status: " in ln), "timeout")  # fmt: skip
    answers = [ln.split()[-1] for ln in r.stdout.splitlines() if "\tIN\tA\t" in ln]
    return status, answers


def test_dns_over_tcp_from_the_endpoint_cgroup_reaches_the_dns_proxy(lab):
    agent, outside = lab
    assert dig_in_cgroup(agent, outside, "api.example.com", "+tcp") == (
        "NOERROR",
        [outside.addr(10)],
    )
    assert dig_in_cgroup(agent, outside, "evil.test", "+tcp")[0] == "REFUSED"


def test_dns_over_udp_from_the_endpoint_cgroup(lab):
    agent, outside = lab
    assert dig_in_cgroup(agent, outside, "api.example.com") == ("NOERROR", [outside.addr(10)])
    assert dig_in_cgroup(agent, outside, "evil.test")[0] == "REFUSED"
