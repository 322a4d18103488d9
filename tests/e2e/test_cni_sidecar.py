"""Podman containers as endpoints of an agent in `--mode sidecar` (issue 18).

At CNI ADD the container's cgroup does not exist yet; the agent opens the sidecar listener in the
container's namespace and attaches the connect() hooks when the runtime makes the cgroup. Checked:
the Star Wars trio (tiefighter PUT -> 403, POST lands, xwing dropped in the kernel) with an egress
L7 rule that the tiefighter's sidecar enforces; its *first* connection (made by the container's
command as it starts) already going through the sidecar, also after `podman restart` (a new
namespace and a new cgroup of the same name); the hooks re-attached by a restarted agent, and the
entry of a container removed while it was down dropped; the hooks' map entry gone after `podman
rm -f`; and what holds while a cgroup is pending (an endpoint whose cgroup never comes: its tc
programs enforce the same policy, L7 through the node proxy).
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
import uuid
from pathlib import Path

import pytest

from redirect_bpf import loader
from tests.agent_runner import AgentProcess, free_pool
from tests.e2e.podman_lab import PodmanLab, build_rootfs, run_plugin
from tests.e2e.test_cni_podman import L3L4, TRIO, _l7_policy, curl, endpoints, ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(300)]

HTTPD = ("/bin/httpd", "-f", "-p", "80", "-h", "/www")
PUT = "PUT /v1/exhaust-port HTTP/1.0\\r\\n\\r\\n"
POST = "POST /cgi-bin/request-landing HTTP/1.0\\r\\nContent-Length: 0\\r\\n\\r\\n"
TIEFIGHTER_EGRESS = textwrap.dedent(
    """
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: tiefighter-egress}
    spec:
      endpointSelector: {matchLabels: {class: tiefighter}}
      egress:
        - toEndpoints:
            - matchLabels: {class: deathstar}
          toPorts:
            - ports: [{port: "80", protocol: TCP}]
              rules:
                http:
                  - method: POST
                    path: /cgi-bin/request-landing
    """
)


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory):
    return build_rootfs(tmp_path_factory.mktemp("cni-rootfs") / "busybox")


@pytest.fixture(scope="module")
def agent():
    with AgentProcess(pool=free_pool(), bpf=True, mode="sidecar") as a:
        yield a


@pytest.fixture(scope="module")
def lab(agent, rootfs, tmp_path_factory):
    with PodmanLab(tmp_path_factory.mktemp("podman"), rootfs, agent.socket) as lab:
        yield lab


@pytest.fixture
def policies(agent, lab):
    egress = lab.base / "tiefighter-egress.yaml"
    egress.write_text(TIEFIGHTER_EGRESS)
    ok(agent, "policy", "import", str(L3L4))
    ok(agent, "policy", "import", str(_l7_policy(lab.base)), str(egress))
    yield
    ok(agent, "policy", "delete", "--all")


def sidecar_conns(agent: AgentProcess, name: str) -> int:
    detail = json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]["detail"]
    found = re.search(rf"\b{re.escape(name)}:\d+ \((\d+) conns\)", detail)
    assert found, f"no sidecar for {name}: {detail}"
    return int(found.group(1))


def cgroup_entries(agent: AgentProcess) -> dict[int, int]:
    """ep_by_cgroup: cgroup id -> sidecar port."""
    loaded = loader.open_pinned(agent.pin_dir)
    try:
        return {k.value: v.sidecar_port for k, v in loaded.maps["ep_by_cgroup"].items()}
    finally:
        loaded.close()


def test_star_wars_trio_in_sidecar_mode(agent, lab, policies):
    lab.run("deathstar", TRIO["deathstar"], *HTTPD)
    star = endpoints(agent)["deathstar"]["ip"]
    # The tiefighter's first process connects as it starts: the hooks must be there already.
    first = f"printf '{PUT}' | nc -w 3 {star} 80 > /first; sleep 600"
    tie_id = lab.run("tiefighter", TRIO["tiefighter"], "/bin/sh", "-c", first)
    lab.run("xwing", TRIO["xwing"], "/bin/sleep", "600")
    eps = endpoints(agent)
    cgroup = Path(eps["tiefighter"]["cgroup"])
    assert cgroup.name == f"libpod-{tie_id}" and cgroup.is_dir()
    port = int(re.search(r"tiefighter:(\d+)", _proxy_detail(agent)).group(1))
    assert cgroup_entries(agent).get(cgroup.stat().st_ino) == port

    def exec_in(name: str, request: str) -> str:
        sh = f"printf '{request}' | nc -w 2 {star} 80"
        return lab.podman("exec", name, "sh", "-c", sh, check=False).stdout

    for _ in range(30):  # the container's command may still be waiting for its answer
        answer = lab.podman("exec", "tiefighter", "cat", "/first", check=False).stdout
        if answer:
            break
        subprocess.run(["sleep", "0.1"])
    assert answer.startswith("HTTP/1.") and " 403 " in answer.splitlines()[0], answer
    assert sidecar_conns(agent, "tiefighter") == 1, "the first connection bypassed the sidecar"

    assert " 403 " in exec_in("tiefighter", PUT).splitlines()[0]
    landed = exec_in("tiefighter", POST)
    assert " 200 " in landed.splitlines()[0] and landed.endswith("Ship landed\n"), landed
    assert sidecar_conns(agent, "tiefighter") == 3
    assert exec_in("xwing", POST) == ""  # dropped in the kernel: no answer at all
    flows = [
        json.loads(x) for x in ok(agent, "observe", "--last", "300", "-o", "json").splitlines()
    ]
    assert any(
        f["verdict"] == "DROPPED" and f["source"].get("container_id") == eps["xwing"][
            "container_id"][:12]
        for f in flows
    )  # fmt: skip

    # podman restart: DEL, ADD into a new namespace, then runc makes a new cgroup of the same
    # name; the hooks follow to it before the command's first connection again.
    lab.podman("exec", "tiefighter", "sh", "-c", ": > /first")
    lab.podman("restart", "-t", "0", "tiefighter")
    restarted = endpoints(agent)["tiefighter"]
    assert restarted["netns"] != eps["tiefighter"]["netns"]
    assert restarted["cgroup"] == str(cgroup)
    port = int(re.search(r"tiefighter:(\d+)", _proxy_detail(agent)).group(1))
    assert cgroup_entries(agent).get(cgroup.stat().st_ino) == port
    for _ in range(30):
        answer = lab.podman("exec", "tiefighter", "cat", "/first", check=False).stdout
        if answer:
            break
        subprocess.run(["sleep", "0.1"])
    assert " 403 " in answer.splitlines()[0], answer
    assert sidecar_conns(agent, "tiefighter") == 4, "after the restart it bypassed the sidecar"

    # A restarted agent finds the running container's cgroup and re-attaches with its new port;
    # a container removed while it was down (DEL could not reach it) leaves no map entry.
    xwing_cgroup = Path(endpoints(agent)["xwing"]["cgroup"]).stat().st_ino
    assert xwing_cgroup in cgroup_entries(agent)
    agent.stop()
    try:
        assert lab.podman("rm", "-f", "-t", "0", "xwing", check=False).returncode == 0
    finally:
        agent.start()
    assert "xwing" not in endpoints(agent)
    assert xwing_cgroup not in cgroup_entries(agent)
    assert endpoints(agent)["tiefighter"]["cgroup"] == str(cgroup)
    new_port = int(re.search(r"tiefighter:(\d+)", _proxy_detail(agent)).group(1))
    assert cgroup_entries(agent).get(cgroup.stat().st_ino) == new_port
    assert " 403 " in exec_in("tiefighter", PUT).splitlines()[0]
    assert sidecar_conns(agent, "tiefighter") == 1
    port = new_port

    for name in ("deathstar", "tiefighter"):
        lab.rm(name)
    assert not set(TRIO) & set(endpoints(agent))
    assert "tiefighter:" not in _proxy_detail(agent)
    assert cgroup.stat().st_ino not in cgroup_entries(agent) if cgroup.exists() else True
    assert port not in cgroup_entries(agent).values()


def _proxy_detail(agent: AgentProcess) -> str:
    return json.loads(ok(agent, "status", "-o", "json"))["parts"]["proxy"]["detail"]


@pytest.fixture
def netns():
    name = f"l7cni{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_while_the_cgroup_is_pending_tc_enforces_the_same_policy(agent, lab, policies, netns):
    """A namespace with no container (so no cgroup will ever come): the window before attach,
    held open. Traffic from it is neither let through unchecked nor left hanging."""
    lab.run("deathstar", TRIO["deathstar"], *HTTPD)
    star = f"http://{endpoints(agent)['deathstar']['ip']}"
    conf = {"cniVersion": "1.0.0", "name": lab.network, **json.loads(lab.conflist.read_text())[
        "plugins"][0]}  # fmt: skip
    cid = uuid.uuid4().hex * 2
    env = {"containerid": cid, "netns": netns, "ifname": "eth0", "args": "K8S_POD_NAME=pending"}
    try:
        code, result = run_plugin(lab.plugin, "ADD", {**conf, "labels": TRIO["tiefighter"]}, **env)
        assert code == 0, result
        ep = endpoints(agent)["pending"]
        assert ep["cgroup"] == ""  # pending: the runtime never made one
        assert curl(netns, "PUT", star + "/v1/exhaust-port") == "403"  # the node proxy's answer
        assert curl(netns, "POST", star + "/cgi-bin/request-landing") == "200"
        assert sidecar_conns(agent, "pending") == 0
        assert run_plugin(lab.plugin, "DEL", conf, **env) == (0, {})

        code, result = run_plugin(lab.plugin, "ADD", {**conf, "labels": TRIO["xwing"]}, **env)
        assert code == 0, result
        assert curl(netns, "POST", star + "/cgi-bin/request-landing") == "timeout"  # kernel drop
    finally:
        run_plugin(lab.plugin, "DEL", conf, **env)
        lab.rm("deathstar")
    assert "pending" not in endpoints(agent)
