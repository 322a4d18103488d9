"""The CNI plugin's pure parts: configuration and CNI_ARGS checks, the label mapping, the result
shape, error objects, podman's state file, the installer's files and the store's container
columns. The plugin against a real agent and real podman: tests/e2e/test_cni_podman.py."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess

import pytest

from l7proxy.agent.container_ops import endpoint_name
from l7proxy.agent.store import EndpointRow, Store
from l7proxy.cni import plugin
from l7proxy.cni.install import install, network_list
from l7proxy.cni.podman_state import podman_labels

CONF = {"cniVersion": "1.0.0", "name": "l7proxy", "type": "l7proxy-cni"}


def run_plugin(monkeypatch, env: dict, stdin: bytes) -> tuple[int, dict]:
    for key in ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = io.StringIO()
    code = plugin.main(stdin=io.BytesIO(stdin), stdout=out)
    return code, json.loads(out.getvalue()) if out.getvalue() else {}


def test_version_answers_without_config(monkeypatch):
    code, out = run_plugin(monkeypatch, {"CNI_COMMAND": "VERSION"}, b"")
    assert code == 0
    assert out["cniVersion"] == "1.0.0" and "1.0.0" in out["supportedVersions"]


@pytest.mark.parametrize(
    ("stdin", "code", "words"),
    [
        (b"{not json", plugin.DECODE_FAILURE, "not JSON"),
        (b"[]", plugin.DECODE_FAILURE, "not a JSON object"),
        (json.dumps({**CONF, "name": ""}).encode(), plugin.INVALID_CONFIG, "'name'"),
        (
            json.dumps({**CONF, "cniVersion": "9.9.9"}).encode(),
            plugin.INCOMPATIBLE_VERSION,
            "9.9.9",
        ),
        (json.dumps({**CONF, "agentTimeout": -1}).encode(), plugin.INVALID_CONFIG, "agentTimeout"),
        (json.dumps({**CONF, "labels": ["a"]}).encode(), plugin.INVALID_CONFIG, "labels"),
    ],
)
def test_bad_config_is_a_cni_error(monkeypatch, stdin, code, words):
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}
    rc, out = run_plugin(monkeypatch, env, stdin)
    assert rc == 1
    assert out["code"] == code and words in out["msg"] + out.get("details", "")
    assert out["cniVersion"]


def test_missing_env_and_unknown_command(monkeypatch):
    rc, out = run_plugin(monkeypatch, {"CNI_COMMAND": "ADD"}, json.dumps(CONF).encode())
    assert (rc, out["code"]) == (1, plugin.INVALID_ENV) and "CNI_CONTAINERID" in out["msg"]
    rc, out = run_plugin(monkeypatch, {"CNI_COMMAND": "GC"}, json.dumps(CONF).encode())
    assert (rc, out["code"]) == (1, plugin.INVALID_ENV) and "GC" in out["msg"]


def test_agent_not_reachable_is_a_clear_error(monkeypatch, tmp_path):
    conf = {**CONF, "agentSocket": str(tmp_path / "none.sock")}
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/x", "CNI_IFNAME": "eth0"}
    rc, out = run_plugin(monkeypatch, env, json.dumps(conf).encode())
    assert rc == 1 and out["code"] == plugin.TRY_AGAIN_LATER
    assert out["msg"] == f"l7proxy agent not reachable at {tmp_path / 'none.sock'}"


def test_check_needs_prev_result_and_0_4(monkeypatch):
    env = {"CNI_COMMAND": "CHECK", "CNI_CONTAINERID": "c1", "CNI_IFNAME": "eth0"}
    rc, out = run_plugin(monkeypatch, env, json.dumps(CONF).encode())
    assert (rc, out["code"]) == (1, plugin.INVALID_CONFIG) and "prevResult" in out["msg"]
    old = {**CONF, "cniVersion": "0.3.1", "prevResult": {}}
    rc, out = run_plugin(monkeypatch, env, json.dumps(old).encode())
    assert (rc, out["code"]) == (1, plugin.INCOMPATIBLE_VERSION)


def test_cni_args():
    args = plugin.parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=web;K8S_POD_NAMESPACE=shop")
    assert args == {"IgnoreUnknown": "1", "K8S_POD_NAME": "web", "K8S_POD_NAMESPACE": "shop"}
    assert plugin.parse_cni_args("") == {}
    with pytest.raises(plugin.CniError) as err:
        plugin.parse_cni_args("K8S_POD_NAME")
    assert err.value.code == plugin.INVALID_ENV


def test_label_mapping():
    labels = plugin.endpoint_labels(
        {"app": "web", "org": "empire", "bad,key": "x", "k": "a,b", "flag": ""},
        {"net": "l7"},
        {"K8S_POD_NAMESPACE": "shop", "K8S_POD_NAME": "web-1"},
    )
    assert labels == [
        "container:net=l7",
        "container:app=web",
        "container:org=empire",
        "container:flag",
        "k8s:io.kubernetes.pod.namespace=shop",
    ]  # the pod name is the endpoint's name, not a label (replicas share an identity)


def test_result_shape_for_1_0_and_0_4():
    ep = {
        "ip": "10.9.0.5", "prefixlen": 32, "router": "10.9.0.1", "host_if": "l7abc",
        "ifname": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "netns": "/run/netns/x",
    }  # fmt: skip
    res = plugin.build_result("1.0.0", ep)
    assert res["ips"] == [{"address": "10.9.0.5/32", "gateway": "10.9.0.1", "interface": 1}]
    assert res["interfaces"][1] == {
        "name": "eth0",
        "mac": "aa:bb:cc:dd:ee:ff",
        "sandbox": "/run/netns/x",
    }
    assert "sandbox" not in res["interfaces"][0]  # the host side (chained plugins read it)
    assert res["routes"] == [{"dst": "0.0.0.0/0", "gw": "10.9.0.1"}]
    assert plugin.build_result("0.4.0", ep)["ips"][0]["version"] == "4"
    dual = {**ep, "ip6": "fd00:9::5", "router6": "fd00:9::1"}
    res = plugin.build_result("1.0.0", dual)
    assert res["ips"][1] == {"address": "fd00:9::5/128", "gateway": "fd00:9::1", "interface": 1}
    assert res["routes"][1] == {"dst": "::/0", "gw": "fd00:9::1"}
    assert [i["version"] for i in plugin.build_result("0.4.0", dual)["ips"]] == ["4", "6"]


def test_podman_labels_from_a_state_file(tmp_path):
    cid = "a" * 64
    other = {"spec": {"hostname": cid[:12]}, "id": "b" * 64, "labels": {"app": "db"}}
    mine = {"spec": {"process": {"args": ["sh"]}}, "id": cid, "labels": {"app": "web"}}
    blob = b"\x00\x10bolt" + compact(other) + b"\x00" * 40 + compact(mine)
    state = tmp_path / "bolt_state.db"
    state.write_bytes(blob + b"\xff\xfe" + cid.encode())
    assert podman_labels([str(tmp_path / "missing.db"), str(state)], cid) == {"app": "web"}
    assert podman_labels([str(state)], "c" * 64) == {}


def test_endpoint_names():
    cid = "0123456789abcdef" * 4
    assert endpoint_name(cid, "web", set()) == "web"
    assert endpoint_name(cid, "web", {"web"}) == "web-0123456789ab"
    assert endpoint_name(cid, "", set()) == "0123456789ab"
    assert endpoint_name(cid, "a/b c", set()) == "a-b-c"


def test_install_writes_a_runnable_plugin_and_a_network_list(tmp_path):
    netlist = network_list("l7", "/tmp/agent.sock", chain=("portmap",))
    plugin_path, conf = install(tmp_path / "bin", tmp_path / "net.d", netlist)
    assert stat.S_IMODE(os.stat(plugin_path).st_mode) == 0o755
    doc = json.loads(conf.read_text())
    assert doc["cniVersion"] == "1.0.0" and doc["name"] == "l7"
    assert [p["type"] for p in doc["plugins"]] == ["l7proxy-cni", "portmap"]
    assert doc["plugins"][0]["agentSocket"] == "/tmp/agent.sock"
    r = subprocess.run(
        [str(plugin_path)], env={"CNI_COMMAND": "VERSION"}, input="", capture_output=True
    )
    assert r.returncode == 0 and json.loads(r.stdout)["cniVersion"] == "1.0.0"
    with pytest.raises(ValueError, match="flannel"):
        network_list("l7", "/s", chain=("flannel",))


def test_store_keeps_container_columns(tmp_path):
    store = Store(tmp_path / "state.db")
    row = EndpointRow(
        "web", "/run/netns/x", "l7abc", "10.0.0.2", 32, ("k8s:app=web",), 256, 1.0, (),
        "c" * 64, "podman", "eth0",
    )  # fmt: skip
    store.add_endpoint(row, {})
    plain = EndpointRow("db", "db", "l7def", "10.0.0.3", 32, (), 257, 1.0)
    store.add_endpoint(plain, {})
    store.close()
    again = Store(tmp_path / "state.db")
    assert again.endpoint("web") == row and again.endpoint("web").adopted
    assert not again.endpoint("db").adopted
    again.delete_endpoint("web")
    assert again.get("endpoint_containers") == {}


def compact(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()  # as podman (Go) writes JSON


def test_cni_install_command(tmp_path, capsys):
    from l7proxy.cli import main

    argv = ["cni", "install", "--bin-dir", str(tmp_path / "bin"), "--conf-dir", str(tmp_path / "d")]
    assert (
        main([*argv, "--socket", "/run/a.sock", "--chain", "bandwidth", "--podman-root", "/p"]) == 0
    )
    assert "l7proxy-cni" in capsys.readouterr().out
    doc = json.loads((tmp_path / "d" / "50-l7proxy.conflist").read_text())
    ours = doc["plugins"][0]
    assert (ours["agentSocket"], ours["podmanState"]) == (
        "/run/a.sock",
        ["/p/libpod/bolt_state.db"],
    )
    assert doc["plugins"][1]["type"] == "bandwidth"
    assert main([*argv, "--network", "a/b"]) == 2
