"""`l7proxy uninstall` against a real agent (root, real BPF): the agent is killed with SIGKILL,
so it cleans up nothing itself, and the command must find and remove its pinned maps and
programs, the tc filters on the endpoint's veth and its cgroup hooks; a second run finds nothing;
while the agent runs the command refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from redirect_bpf import bpfsys, cgroups, tc
from tests.agent_runner import AgentProcess, free_pool

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(180)]

HOOKS = [kind for _, kind in (*cgroups.SIDECAR_HOOKS, *cgroups.PROXY_HOOKS)]


def uninstall(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "l7proxy", "uninstall", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def bpf_filters(ifname: str) -> list:
    """The BPF filters on the link's clsact hooks (not the per-priority chain heads)."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        assert index, f"the endpoint's veth {ifname} is gone: the test cannot check it"
        found = []
        for parent in (tc.INGRESS, tc.EGRESS):
            try:
                found += [
                    f
                    for f in ipr.get_filters(index[0], parent=parent)
                    if f.get_attr("TCA_KIND") == "bpf" and f.get_attr("TCA_OPTIONS") is not None
                ]
            except NetlinkError:
                pass  # no clsact at all
        return found


def pinned_prog_ids(pin_dir) -> set[int]:
    ids = set()
    for pin in pin_dir.glob("prog_*"):
        fd = bpfsys.obj_get(pin)
        try:
            ids.add(bpfsys.prog_id(fd))
        finally:
            os.close(fd)
    return ids


def cgroup_attachments(prog_ids: set[int]) -> list[str]:
    """Every cgroup v2 directory where one of these programs is attached."""
    out = []
    for dirpath, _dirs, _files in os.walk(cgroups.CGROUP_V2_ROOT):
        try:
            fd = cgroups.open_dir(dirpath)
        except OSError:
            continue
        try:
            for kind in HOOKS:
                try:
                    if bpfsys.attached_prog_ids(fd, kind) & prog_ids:
                        out.append(f"{dirpath} ({kind})")
                except OSError:
                    pass
        finally:
            os.close(fd)
    return out


def test_uninstall_removes_what_a_killed_agent_left(tmp_path):
    agent = AgentProcess(pool=free_pool(), bpf=True, mode="sidecar")
    agent.start()
    try:
        r = agent.cli("endpoint", "create", "web", "--labels", "app=web")
        assert r.returncode == 0, r.stderr + agent.log()
        ep = json.loads(agent.cli("endpoint", "list", "-o", "json", check=True).stdout)[0]
        pin_dir, veth = agent.pin_dir, ep["host_if"]

        # what the agent made, seen from the kernel
        prog_ids = pinned_prog_ids(pin_dir)
        assert len(prog_ids) >= 4 and any(pin_dir.glob("map_*"))
        assert len(bpf_filters(veth)) == 2  # from_endpoint and to_endpoint
        attached = cgroup_attachments(prog_ids)
        assert any(ep["cgroup"] in a for a in attached), attached

        refused = uninstall("--bpf-dir", str(pin_dir))
        assert refused.returncode == 1
        assert f"an l7proxy agent is running: pid {agent.proc.pid}" in refused.stderr
        assert "--force" in refused.stderr
        assert any(pin_dir.glob("map_*"))  # refused: nothing touched

        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(10)
        assert any(pin_dir.glob("map_*")) and len(bpf_filters(veth)) == 2  # a kill cleans nothing

        first = uninstall("--bpf-dir", str(pin_dir), "--state-dir", str(agent.state_dir))
        assert first.returncode == 0, first.stderr
        assert f"removed pins {pin_dir}" in first.stdout
        assert f"removed tc clsact and its BPF filters on {veth}" in first.stdout
        assert f"removed cgroup hooks on {ep['cgroup']}" in first.stdout

        assert not pin_dir.exists()
        assert bpf_filters(veth) == []
        assert cgroup_attachments(prog_ids) == []

        again = uninstall("--bpf-dir", str(pin_dir), "--state-dir", str(agent.state_dir))
        assert again.returncode == 0 and again.stdout == "nothing to remove\n", again.stdout
    finally:
        agent.close()


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for its parent (an empty cmdline)."""
    try:
        return bool(Path(f"/proc/{pid}/cmdline").read_bytes())
    except OSError:
        return False


def test_uninstall_stops_the_proxy_worker_a_killed_agent_left(tmp_path):
    agent = AgentProcess(
        pool=free_pool(), bpf=True, mode="node", extra_args=("--proxy-worker", "process")
    )
    agent.start()
    try:
        r = agent.cli("endpoint", "create", "web", "--labels", "app=web")
        assert r.returncode == 0, r.stderr + agent.log()
        ep = json.loads(agent.cli("endpoint", "list", "-o", "json", check=True).stdout)[0]
        worker = agent.client.call("status")["parts"]["proxy"]["detail"]
        pid = int(worker.split("worker pid ")[1].split()[0])
        agent.proc.send_signal(signal.SIGKILL)
        agent.proc.wait(10)
        assert running(pid)  # the worker outlives its agent, by design

        first = uninstall("--bpf-dir", str(agent.pin_dir), "--state-dir", str(agent.state_dir))
        assert first.returncode == 0, first.stderr
        assert f"removed proxy worker process {pid}" in first.stdout
        assert f"removed tc clsact and its BPF filters on {ep['host_if']}" in first.stdout
        assert not running(pid)
        assert not agent.pin_dir.exists() and bpf_filters(ep["host_if"]) == []
        again = uninstall("--bpf-dir", str(agent.pin_dir), "--state-dir", str(agent.state_dir))
        assert again.returncode == 0 and again.stdout == "nothing to remove\n", again.stdout
    finally:
        agent.close()
