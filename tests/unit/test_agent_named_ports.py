"""Named ports in agent mode: `endpoint create --port NAME=NUMBER[/PROTO]`, validation, the store
(and a state directory made before named ports existed), and the table every agent compile gets
(the agent's own, which feeds the datapath and the inline proxy, and the worker process's)."""

import asyncio
import json
import sqlite3

import pytest

import policies
from l7proxy.agent import ports
from l7proxy.agent.api import ApiError
from l7proxy.agent.daemon import Agent, AgentConfig
from l7proxy.agent.ops import normalize_labels
from l7proxy.agent.proxy_worker_process import WorkerView
from l7proxy.agent.store import EndpointRow, PolicyDoc, Store
from l7proxy.cli import main

WEB = ports.NamedPort("web", 8080, "TCP")

INGRESS_WEB = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web}
spec:
  endpointSelector: {matchLabels: {app: server}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{ports: [{port: web, protocol: TCP}]}]
"""

EGRESS_WEB = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: out}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
    - toEndpoints: [{matchLabels: {app: server}}]
      toPorts: [{ports: [{port: web, protocol: TCP}]}]
"""


@pytest.mark.parametrize(
    "spec, want",
    [
        ("web=8080", ports.NamedPort("web", 8080, "TCP")),
        ("dns=53/udp", ports.NamedPort("dns", 53, "UDP")),
        ("http-alt=65535/SCTP", ports.NamedPort("http-alt", 65535, "SCTP")),
        ("a1=1", ports.NamedPort("a1", 1, "TCP")),
        ("abcdefghijklmno=80", ports.NamedPort("abcdefghijklmno", 80, "TCP")),  # 15 chars
    ],
)
def test_parse_accepts_iana_svc_names(spec, want):
    assert ports.parse(spec) == want


@pytest.mark.parametrize(
    "spec, message",
    [
        ("web", "bad port 'web': expected NAME=NUMBER"),
        ("Web=80", "bad port name 'Web': only lowercase"),
        ("web_1=80", "bad port name 'web_1': only lowercase"),
        ("=80", "bad port name '': it is empty"),
        ("abcdefghijklmnop=80", "bad port name 'abcdefghijklmnop': it is longer than 15"),
        ("8080=80", "bad port name '8080': it needs at least one letter"),
        ("-web=80", "must not begin or end with '-'"),
        ("web-=80", "must not begin or end with '-'"),
        ("we--b=80", "must not contain '--'"),
        ("web=0", "bad port number '0' for 'web': must be 1-65535"),
        ("web=65536", "bad port number '65536' for 'web'"),
        ("web=http", "bad port number 'http' for 'web'"),
        ("web=", "bad port number '' for 'web'"),
        ("web=80/icmp", "bad protocol 'icmp' for 'web'"),
    ],
)
def test_parse_names_the_bad_value(spec, message):
    with pytest.raises(ValueError) as info:
        ports.parse(spec)
    assert message in str(info.value)


def test_from_json_validates_api_input_and_rejects_a_name_given_twice():
    got = ports.from_json([{"name": "web", "port": 8080}, "dns=53/UDP"])
    assert got == (ports.NamedPort("dns", 53, "UDP"), WEB)  # sorted by name
    assert ports.from_json(None) == ()
    with pytest.raises(ValueError, match="'web' given twice"):
        ports.from_json(["web=80", "web=81"])
    with pytest.raises(ValueError, match="bad port number True"):
        ports.from_json([{"name": "web", "port": True}])
    with pytest.raises(ValueError, match="bad port name 'WEB'"):
        ports.from_json([{"name": "WEB", "port": 80}])


def test_table_is_keyed_by_endpoint_name_and_leaves_out_endpoints_without_ports():
    assert ports.table([("server", (WEB,)), ("client", ())]) == {"server": {"web": 8080}}


def test_cli_rejects_a_bad_port_before_calling_the_agent(capsys):
    with pytest.raises(SystemExit) as info:
        main(["endpoint", "create", "x", "--labels", "a=b", "--port", "Web=80"])
    assert info.value.code == 2
    assert "bad port name 'Web'" in capsys.readouterr().err


class _FakeClient:
    calls: list = []
    endpoints: list = []

    def __init__(self, socket=None, timeout=None) -> None:
        pass

    def call(self, op, **args):
        _FakeClient.calls.append((op, args))
        if op == "endpoint.create":
            return {
                "name": args["name"],
                "netns": args["name"],
                "ip": "10.251.0.2",
                "prefixlen": 32,
                "identity": 256,
                "host_if": "l7x",
                "ports": args["ports"],
            }
        return _FakeClient.endpoints


def test_cli_sends_ports_and_lists_them(monkeypatch, capsys):
    monkeypatch.setattr("l7proxy.commands.endpoint.Client", _FakeClient)
    _FakeClient.calls = []
    argv = ["endpoint", "create", "srv", "--labels", "app=server"]
    assert main([*argv, "--port", "web=8080", "--port", "dns=53/udp"]) == 0
    op, args = _FakeClient.calls[0]
    assert op == "endpoint.create"
    assert args["ports"] == [
        {"name": "dns", "port": 53, "protocol": "UDP"},
        {"name": "web", "port": 8080, "protocol": "TCP"},
    ]
    assert "ports dns=53/UDP,web=8080/TCP" in capsys.readouterr().out
    assert main([*argv, "--port", "web=80", "--port", "web=81"]) == 2
    assert "'web' given twice" in capsys.readouterr().err

    row = EndpointRow("srv", "srv", "l7x", "10.251.0.2", 32, ("k8s:app=server",), 256, 1.0)
    _FakeClient.endpoints = [
        {**row.to_json(), "ports": [WEB.to_json()]},
        {**row.to_json(), "name": "cli", "ports": []},
    ]
    assert main(["endpoint", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[6] == "PORTS"
    assert lines[1].split()[6] == "web=8080/TCP" and lines[2].split()[6] == "-"
    assert main(["endpoint", "list", "-o", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["ports"] == [{"name": "web", "port": 8080, "protocol": "TCP"}]


def test_store_keeps_ports_across_reopen_and_forgets_them_on_delete(tmp_path):
    store = Store(tmp_path / "state.db")
    dns = ports.NamedPort("dns", 53, "UDP")
    row = EndpointRow("srv", "p-srv", "l7a", "10.251.0.2", 32, (), 256, 1.0, (dns, WEB))
    store.add_endpoint(row, {})
    store.add_endpoint(EndpointRow("cli", "p-cli", "l7b", "10.251.0.3", 32, (), 257, 1.0), {})
    store.close()
    again = Store(tmp_path / "state.db")
    assert again.endpoint("srv") == row
    assert again.endpoint("srv").to_json()["ports"][1] == {
        "name": "web",
        "port": 8080,
        "protocol": "TCP",
    }
    assert again.endpoint("cli").ports == ()
    again.delete_endpoint("srv")
    assert again.get("endpoint_ports") == {}
    # a new endpoint of the same name does not inherit the old one's ports
    again.add_endpoint(EndpointRow("srv", "p-srv", "l7a", "10.251.0.2", 32, (), 256, 2.0), {})
    assert again.endpoint("srv").ports == ()


def test_a_state_directory_from_before_named_ports_opens(tmp_path):
    # what the previous version wrote: the same tables, no endpoint_ports key
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(
        """
        CREATE TABLE endpoints (name TEXT PRIMARY KEY, netns TEXT NOT NULL,
            host_if TEXT NOT NULL, ip TEXT NOT NULL, prefixlen INTEGER NOT NULL,
            labels TEXT NOT NULL, identity INTEGER NOT NULL, created REAL NOT NULL);
        CREATE TABLE kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO endpoints VALUES ('old', 'old', 'l7c', '10.251.0.4', 32,
            '["k8s:app=server"]', 300, 1.0);
        """
    )
    db.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    (old,) = store.endpoints()
    assert old.name == "old" and old.ports == () and old.to_json()["ports"] == []
    store.delete_endpoint("old")
    assert store.endpoints() == []


class _RecordingDatapath:
    def __init__(self) -> None:
        self.applied = []

    def apply(self, compiled, ipcache_entries, proxy_ports) -> None:
        self.applied.append(compiled)


def _agent(tmp_path, server_ports) -> Agent:
    agent = Agent(AgentConfig(state_dir=tmp_path, pool="10.251.9.0/24", bpf=False))
    agent.datapath = _RecordingDatapath()
    for i, (name, app, named) in enumerate(
        (("srv", "server", server_ports), ("cli", "client", ()))
    ):
        labels = normalize_labels(f"app={app}")
        identity = agent.allocator.allocate(policies.parse_labels(",".join(labels)))
        row = EndpointRow(name, name, f"l7{i}", f"10.251.9.{i + 2}", 32, tuple(labels), identity, 1.0, named)  # fmt: skip
        agent.store.add_endpoint(row, agent.allocator.to_state())
        agent._index(row)
    return agent


def _doc(text: str) -> PolicyDoc:
    return PolicyDoc("cnp/default/x", "x", "default", "x.yaml", text, 1)


@pytest.mark.parametrize("text, direction, at", [(INGRESS_WEB, "ingress", "srv"), (EGRESS_WEB, "egress", "cli")])  # fmt: skip
def test_agent_compile_resolves_named_ports_for_the_datapath(tmp_path, text, direction, at):
    agent = _agent(tmp_path, (WEB,))
    try:
        agent._install(agent._recompile(1, [_doc(text)]))
        (compiled,) = agent.datapath.applied  # what the kernel's maps are written from
        assert agent.compiled is compiled  # and what the inline proxy reads
        assert not compiled.diagnostics
        d = policies.INGRESS if direction == "ingress" else policies.EGRESS
        peer = agent.store.endpoint("cli" if at == "srv" else "srv").identity
        assert policies.l4_verdict(compiled, at, peer, d, 6, 8080).action == "allow"
        assert policies.l4_verdict(compiled, at, peer, d, 6, 8081).action == "deny"
    finally:
        agent.store.close()


def test_agent_compile_without_ports_allows_nothing_and_says_why(tmp_path):
    agent = _agent(tmp_path, ())
    try:
        compiled = agent._recompile(1, [_doc(INGRESS_WEB)])
        peer = agent.store.endpoint("cli").identity
        verdict = policies.l4_verdict(compiled, "srv", peer, policies.INGRESS, 6, 8080)
        assert verdict.action == "deny"
        assert any("named port 'web'" in d.reason for d in compiled.diagnostics)
    finally:
        agent.store.close()


def test_agent_api_rejects_bad_ports_before_any_plumbing(tmp_path):
    agent = _agent(tmp_path, ())
    try:
        with pytest.raises(ApiError, match="bad port number 70000 for 'web'"):
            asyncio.run(
                agent.op_endpoint_create(
                    {"name": "x", "labels": "a=b", "ports": [{"name": "web", "port": 70000}]}
                )
            )
        assert agent.store.endpoint("x") is None
    finally:
        agent.store.close()


def test_worker_compiles_with_the_agents_named_ports(tmp_path):
    from l7proxy.agent.proxy_worker_control import WorkerHandle

    agent = _agent(tmp_path, (WEB,))
    try:
        agent.store.policy_replace([_doc(INGRESS_WEB)], 1)
        state = WorkerHandle(agent, pid=0, port=0, reused=True).state()
        assert state["endpoints"][1]["ports"] == [WEB.to_json()]  # sorted: cli, srv
        view = WorkerView("node")
        view.apply(state)
        peer = agent.store.endpoint("cli").identity
        v = policies.l4_verdict(view.compiled, "srv", peer, policies.INGRESS, 6, 8080)
        assert v.action == "allow" and not view.compiled.diagnostics
        # a state from an agent older than named ports: no "ports", nothing resolves
        for ep in state["endpoints"]:
            del ep["ports"]
        view.apply(state)
        v = policies.l4_verdict(view.compiled, "srv", peer, policies.INGRESS, 6, 8080)
        assert v.action == "deny"
    finally:
        agent.store.close()
