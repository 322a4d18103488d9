"""Real podman containers as the agent's endpoints through the l7proxy CNI plugin (issue 18).

One dual-stack agent (--pool6) with the BPF datapath and the node proxy serves the module; podman runs busybox
containers from a rootfs (no registry) on a CNI network whose plugin list is l7proxy-cni, then
portmap and bandwidth. Checked: the Star Wars trio under the L3/L4 and L7 policies (xwing dropped
in the kernel, tiefighter PUT -> 403, POST lands; the same over IPv6: each container has both
families), `endpoint list` and `observe` naming the
containers, chaining, `podman rm -f` leaving nothing behind, the CNI conformance points against
the installed plugin, and agent restarts (endpoints kept; a container gone meanwhile reaped).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from l7proxy.agent import netdev
from redirect_bpf import ipcache, loader, structs
from tests.agent_runner import AgentProcess, free_pool, free_pool6
from tests.e2e.podman_lab import PodmanLab, build_rootfs, run_plugin

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
L3L4 = REPO / "demo" / "sw_l3_l4_policy.yaml"
L7 = REPO / "demo" / "sw_l3_l4_l7_policy.yaml"
TRIO = {
    "deathstar": {"org": "empire", "class": "deathstar"},
    "tiefighter": {"org": "empire", "class": "tiefighter"},
    "xwing": {"org": "alliance", "class": "xwing"},
}


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory):
    if shutil.which("podman") is None or not Path("/usr/lib/cni/portmap").exists():
        pytest.fail("podman, runc and containernetworking-plugins are missing: run make setup")
    return build_rootfs(tmp_path_factory.mktemp("cni-rootfs") / "busybox")


@pytest.fixture(scope="module")
def agent():
    with AgentProcess(pool=free_pool(), bpf=True, extra_args=("--pool6", free_pool6())) as a:
        yield a


@pytest.fixture(scope="module")
def lab(agent, rootfs, tmp_path_factory):
    base = tmp_path_factory.mktemp("podman")
    with PodmanLab(base, rootfs, agent.socket, ("portmap", "bandwidth")) as lab:
        yield lab


def ok(agent: AgentProcess, *args: str) -> str:
    r = agent.cli(*args)
    assert r.returncode == 0, f"l7proxy {' '.join(args)}: {r.stderr}\n{agent.log()}"
    return r.stdout


def endpoints(agent: AgentProcess) -> dict[str, dict]:
    return {e["name"]: e for e in json.loads(ok(agent, "endpoint", "list", "-o", "json"))}


def curl(netns: str, method: str, url: str, timeout: float = 1.5) -> str:
    """An HTTP request from inside a container's network namespace; the status or 'timeout'."""
    r = subprocess.run(
        ["nsenter", f"--net={netns}", "curl", "-s", "-m", str(timeout), "-X", method,
         "-o", "/dev/null", "-w", "%{http_code}", url],
        capture_output=True,
        text=True,
    )  # fmt: skip
    return "timeout" if r.returncode == 28 else r.stdout


def kernel_state(agent: AgentProcess, ip: str) -> dict:
    """What the pinned maps still hold for an address: ipcache, endpoint tables, policy keys."""
    loaded = loader.open_pinned(agent.pin_dir)
    try:
        addr = ipcache.be32(ip)
        ids = [v.endpoint_id for _, v in loaded.maps["ep_by_ifindex"].items() if v.ipv4 == addr]
        return {
            "ipcache": ipcache.lookup(loaded.maps["ipcache"], ip),
            "ep_by_ip": loaded.maps["ep_by_ip"].get(structs.u32(addr)) is not None,
            "ep_by_ifindex": ids,
        }
    finally:
        loaded.close()


def policy_keys(agent: AgentProcess, endpoint_id: int) -> int:
    loaded = loader.open_pinned(agent.pin_dir)
    try:
        return sum(
            1
            for name in ("policy_allow", "policy_deny")
            for k in loaded.maps[name].keys()
            if k.endpoint_id == endpoint_id
        )
    finally:
        loaded.close()


def test_star_wars_trio_under_policy(agent, lab):
    ids = {name: lab.run(name, labels, *cmd) for (name, labels), cmd in zip(
        TRIO.items(),
        (["/bin/httpd", "-f", "-p", "80", "-h", "/www"], ["/bin/sleep", "600"], ["/bin/sleep", "600"]),
        strict=True,
    )}  # fmt: skip
    eps = endpoints(agent)
    for name, cid in ids.items():
        ep = eps[name]
        assert (ep["container_id"], ep["runtime"], ep["ifname"]) == (cid, "podman", "eth0")
        assert f"container:org={TRIO[name]['org']}" in ep["labels"]
    table = ok(agent, "endpoint", "list")
    assert f"podman:{ids['xwing'][:12]}" in table
    star = f"http://{eps['deathstar']['ip']}"
    netns = {name: eps[name]["netns"] for name in TRIO}
    assert curl(netns["xwing"], "GET", star + "/") == "200"  # no policy yet

    star6 = f"http://[{eps['deathstar']['ip6']}]"  # each container has an IPv6 address too
    assert curl(netns["xwing"], "GET", star6 + "/") == "200"

    ok(agent, "policy", "import", str(L3L4))
    assert curl(netns["xwing"], "GET", star + "/") == "timeout"  # dropped in the kernel
    assert curl(netns["tiefighter"], "GET", star + "/") == "200"
    assert curl(netns["xwing"], "GET", star6 + "/") == "timeout"  # the same policy over IPv6
    assert curl(netns["tiefighter"], "GET", star6 + "/") == "200"
    # A process inside the container, not only its namespace, goes through the same path.
    # (busybox-static's wget crashes without NSS files; nc speaks HTTP/1.0 well enough.)
    request = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {eps['deathstar']['ip']} 80"
    r = lab.podman("exec", "tiefighter", "sh", "-c", request)
    assert r.stdout.startswith("HTTP/1.") and r.stdout.endswith("deathstar\n")

    ok(agent, "policy", "import", str(_l7_policy(lab.base)))
    assert curl(netns["tiefighter"], "PUT", star + "/v1/exhaust-port") == "403"
    assert curl(netns["tiefighter"], "PUT", star6 + "/v1/exhaust-port") == "403"
    assert curl(netns["tiefighter"], "POST", star + "/cgi-bin/request-landing") == "200"
    assert curl(netns["xwing"], "POST", star + "/cgi-bin/request-landing") == "timeout"

    out = ok(agent, "observe", "--last", "200", "-o", "json")
    flows = [json.loads(line) for line in out.splitlines() if line.strip()]
    dropped = [
        f for f in flows
        if f.get("verdict") == "DROPPED" and f["source"].get("pod_name") == "xwing"
    ]  # fmt: skip
    assert dropped and dropped[-1]["source"]["container_id"] == ids["xwing"][:12]
    assert dropped[-1]["source"]["runtime"] == "podman"
    compact = ok(agent, "observe", "--last", "200")
    assert f"xwing[podman:{ids['xwing'][:12]}]" in compact

    ok(agent, "policy", "delete", "--all")
    for name in TRIO:
        lab.rm(name)
    assert not set(TRIO) & set(endpoints(agent))


def _l7_policy(where: Path) -> Path:
    # busybox httpd runs CGI programs only under /cgi-bin/: the demo's rule, at that path.
    text = L7.read_text().replace("/v1/request-landing", "/cgi-bin/request-landing")
    path = where / "l7.yaml"
    path.write_text(text)
    return path


def test_podman_rm_leaves_nothing_behind(agent, lab):
    app = f"tmp-{uuid.uuid4().hex[:6]}"
    lab.run("shortlived", {"app": app}, "/bin/sleep", "600")
    ep = endpoints(agent)["shortlived"]
    before = kernel_state(agent, ep["ip"])
    assert before["ipcache"] == ep["identity"] and before["ep_by_ip"]
    (endpoint_id,) = before["ep_by_ifindex"]
    ok(agent, "policy", "import", str(L3L4))  # gives endpoints policy keys to leave behind
    try:
        # A restart is DEL then ADD (a new namespace): still one endpoint, one map entry.
        lab.podman("restart", "-t", "0", "shortlived")
        mine = [e for e in endpoints(agent).values() if e["container_id"] == ep["container_id"]]
        assert len(mine) == 1 and mine[0]["netns"] != ep["netns"]
        assert len(kernel_state(agent, mine[0]["ip"])["ep_by_ifindex"]) == 1
        if mine[0]["ip"] != ep["ip"]:
            assert kernel_state(agent, ep["ip"])["ep_by_ifindex"] == []
        ep = mine[0]
        (endpoint_id,) = kernel_state(agent, ep["ip"])["ep_by_ifindex"]
        lab.rm("shortlived")
        assert "shortlived" not in endpoints(agent)
        r = subprocess.run(["ip", "link", "show", ep["host_if"]], capture_output=True)
        assert r.returncode != 0, "the host veth is still there"
        after = kernel_state(agent, ep["ip"])
        assert after == {"ipcache": 2, "ep_by_ip": False, "ep_by_ifindex": []}  # 2: world
        assert policy_keys(agent, endpoint_id) == 0
        identities = json.loads(ok(agent, "identity", "list", "-o", "json"))
        assert not [i for i in identities if f"container:app={app}" in i["labels"]]
        # The address is free again: the next container gets it.
        lab.run("reuse", {"app": app}, "/bin/sleep", "600")
        assert endpoints(agent)["reuse"]["ip"] == ep["ip"]
        lab.rm("reuse")
    finally:
        ok(agent, "policy", "delete", "--all")


def test_chained_portmap_and_bandwidth(agent, lab):
    port = _free_port()
    lab.run("chained", {"app": "chained"}, "/bin/httpd", "-f", "-p", "80", "-h", "/www",
            ports=(f"{port}:80",))  # fmt: skip
    ep = endpoints(agent)["chained"]
    try:
        qdiscs = subprocess.run(
            ["tc", "qdisc", "show", "dev", ep["host_if"]], capture_output=True, text=True
        ).stdout
        assert "tbf" in qdiscs and "clsact" in qdiscs  # bandwidth's shaper beside our programs
        host = _host_address()
        deadline = time.monotonic() + 10
        while True:
            r = subprocess.run(
                ["curl", "-s", "-m", "2", f"http://{host}:{port}/"], capture_output=True, text=True
            )
            if r.stdout == "deathstar\n" or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.stdout == "deathstar\n", "portmap's DNAT to the container did not answer"
    finally:
        lab.rm("chained")
    rules = subprocess.run(["iptables-save", "-t", "nat"], capture_output=True, text=True).stdout
    assert f"--dport {port} " not in rules  # portmap's DEL ran too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _host_address() -> str:
    out = subprocess.run(["ip", "-4", "-o", "route", "get", "1.1.1.1"], capture_output=True,
                         text=True).stdout.split()  # fmt: skip
    return out[out.index("src") + 1]


@pytest.fixture
def netns():
    name = f"l7cni{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_cni_conformance_against_the_agent(agent, lab, netns):
    conf = {"cniVersion": "1.0.0", "name": lab.network, **json.loads(lab.conflist.read_text())[
        "plugins"][0]}  # fmt: skip
    cid = uuid.uuid4().hex * 2
    env = {"containerid": cid, "netns": netns, "ifname": "eth0", "args": "K8S_POD_NAME=conf"}

    code, version = run_plugin(lab.plugin, "VERSION", {"cniVersion": "1.0.0"})
    assert code == 0 and "1.0.0" in version["supportedVersions"]

    code, result = run_plugin(lab.plugin, "ADD", conf, **env)
    assert code == 0, result
    ep = endpoints(agent)["conf"]
    assert result["cniVersion"] == "1.0.0"
    status = agent.client.call("status")
    assert result["ips"] == [
        {"address": f"{ep['ip']}/32", "gateway": status["router"], "interface": 1},
        {"address": f"{ep['ip6']}/128", "gateway": status["router6"], "interface": 1},
    ]
    assert result["routes"][1] == {"dst": "::/0", "gw": status["router6"]}
    assert result["interfaces"][1]["sandbox"] == netns and result["interfaces"][1]["mac"]
    inner = subprocess.run(["ip", "-n", Path(netns).name, "-4", "-o", "addr", "show", "eth0"],
                           capture_output=True, text=True).stdout  # fmt: skip
    assert f"{ep['ip']}/32" in inner

    checked = {**conf, "prevResult": result}
    assert run_plugin(lab.plugin, "CHECK", checked, **env) == (0, {})
    # Break it behind the agent's back: CHECK says what is wrong.
    subprocess.run(["ip", "-n", Path(netns).name, "addr", "flush", "dev", "eth0"], check=True)
    code, err = run_plugin(lab.plugin, "CHECK", checked, **env)
    assert code == 1 and err["code"] == 100 and "not " + ep["ip"] in err["msg"]

    assert run_plugin(lab.plugin, "DEL", checked, **env) == (0, {})
    assert run_plugin(lab.plugin, "DEL", checked, **env) == (0, {})  # idempotent
    unknown = {**env, "containerid": "f" * 64}
    assert run_plugin(lab.plugin, "DEL", conf, **unknown) == (0, {})
    assert "conf" not in endpoints(agent)

    # A failed ADD leaves nothing: `lo` exists in the namespace, so naming the veth fails late.
    identities = len(json.loads(ok(agent, "identity", "list", "-o", "json")))
    code, err = run_plugin(lab.plugin, "ADD", conf, **{**env, "ifname": "lo"})
    assert code == 1 and err["code"] == 100 and err["msg"].startswith("l7proxy agent:")
    assert "conf" not in endpoints(agent)
    assert len(json.loads(ok(agent, "identity", "list", "-o", "json"))) == identities
    veth = netdev.host_ifname(f"{cid}/lo")
    assert subprocess.run(["ip", "link", "show", veth], capture_output=True).returncode != 0

    code, err = run_plugin(lab.plugin, "ADD", {**conf, "cniVersion": "0.1.0"}, **env)
    assert code == 1 and err["code"] == 1
    code, err = run_plugin(lab.plugin, "ADD", {**conf, "name": ""}, **env)
    assert code == 1 and err["code"] == 7


def test_agent_down_is_a_clear_error_and_restart_keeps_and_reaps(agent, lab, netns):
    lab.run("survivor", {"app": "survivor"}, "/bin/httpd", "-f", "-p", "80", "-h", "/www")
    lab.run("victim", {"app": "victim"}, "/bin/sleep", "600")
    lab.run("echo", {"app": "echo"}, "/bin/nc", "-l", "-p", "9000", "-e", "/bin/cat")
    lab.run("client", {"app": "client"}, "/bin/sleep", "600")
    eps = endpoints(agent)
    stream = EchoStream(eps["client"]["netns"], eps["echo"]["ip"], 9000)
    assert stream.roundtrip("before") == "before"
    conf = {"cniVersion": "1.0.0", "name": lab.network, **json.loads(lab.conflist.read_text())[
        "plugins"][0]}  # fmt: skip
    agent.stop()
    try:
        started = time.monotonic()
        code, err = run_plugin(lab.plugin, "ADD", conf, containerid="d" * 64, netns=netns,
                               ifname="eth0")  # fmt: skip
        assert code == 1 and err["code"] == 11
        assert err["msg"] == f"l7proxy agent not reachable at {agent.socket}"
        assert time.monotonic() - started < 5
        # The kernel keeps forwarding while the agent is away.
        victim_ns = eps["victim"]["netns"]
        assert curl(victim_ns, "GET", f"http://{eps['survivor']['ip']}/") == "200"
        # The victim dies while the agent is down: podman's DEL cannot reach it.
        r = lab.podman("rm", "-f", "-t", "0", "victim", check=False)
        assert r.returncode == 0, r.stderr
        assert stream.roundtrip("while-away") == "while-away"
    finally:
        agent.start()
    assert stream.roundtrip("after") == "after"  # the same TCP connection, across the restart
    stream.close()
    after = endpoints(agent)
    assert "victim" not in after, "the dead container's endpoint was not reaped"
    assert after["survivor"]["ip"] == eps["survivor"]["ip"]
    assert kernel_state(agent, eps["victim"]["ip"])["ep_by_ifindex"] == []
    r = subprocess.run(["curl", "-s", "-m", "3", f"http://{eps['survivor']['ip']}/"],
                       capture_output=True, text=True)  # fmt: skip
    assert r.stdout == "deathstar\n"  # host -> the kept endpoint, through its re-attached veth
    for name in ("survivor", "echo", "client"):
        lab.rm(name)
    assert not {"survivor", "echo", "client"} & set(endpoints(agent))


ECHO_CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
for line in sys.stdin:
    s.sendall(line.encode())
    print(s.recv(4096).decode().strip(), flush=True)
"""


class EchoStream:
    """One TCP connection from a container's namespace, kept open across agent restarts."""

    def __init__(self, netns: str, ip: str, port: int) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={netns}", sys.executable, "-c", ECHO_CLIENT, ip, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def roundtrip(self, word: str) -> str:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)
