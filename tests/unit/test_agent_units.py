"""The agent's pure parts: store transactions, the IP pool, flow filters and formats, policy docs."""

import asyncio
import json

import pytest

from l7proxy.agent.api import ApiError
from l7proxy.agent.flowlog import FlowFilter, FlowLog, compact, table
from l7proxy.agent.ipam import IPPool, PoolExhausted
from l7proxy.agent.policy_repo import merge, remove, split_documents
from l7proxy.agent.store import EndpointRow, PolicyDoc, Store


def test_pool_allocates_lowest_free_address_after_the_router():
    pool = IPPool("10.251.7.0/29")
    assert pool.router == "10.251.7.1"
    assert pool.allocate([]) == "10.251.7.2"
    assert pool.allocate(["10.251.7.2", "10.251.7.4"]) == "10.251.7.3"
    with pytest.raises(PoolExhausted):
        pool.allocate([f"10.251.7.{i}" for i in range(2, 7)])
    with pytest.raises(ValueError, match="router"):
        pool.validate("10.251.7.1", [])
    with pytest.raises(ValueError, match="already used"):
        pool.validate("10.251.7.3", ["10.251.7.3"])


def test_store_keeps_endpoints_identities_and_policies_across_reopen(tmp_path):
    store = Store(tmp_path / "state.db")
    row = EndpointRow("web", "p-web", "l7abc", "10.251.0.2", 32, ("k8s:app=web",), 256, 1.0)
    store.add_endpoint(row, {"identities": [{"id": 256, "labels": ["k8s:app=web"]}]})
    doc = PolicyDoc("cnp/default/r1", "r1", "default", "a.yaml", "kind: x\n", 1)
    store.policy_replace([doc], 1)
    store.close()
    again = Store(tmp_path / "state.db")
    assert again.endpoints() == [row]
    assert again.get("identities")["identities"][0]["id"] == 256
    assert again.policies() == [doc]
    assert again.revision() == 1
    assert again.get("policy_change_total") == 1


def test_store_duplicate_endpoint_rolls_back_the_identity_state(tmp_path):
    store = Store(tmp_path / "state.db")
    row = EndpointRow("web", "p-web", "l7abc", "10.251.0.2", 32, (), 256, 1.0)
    store.add_endpoint(row, {"n": 1})
    with pytest.raises(Exception, match="UNIQUE"):
        store.add_endpoint(row, {"n": 2})
    assert store.get("identities") == {"n": 1}


CNP = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: rule1}
spec:
  endpointSelector: {matchLabels: {org: empire}}
---
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: wide}
spec:
  endpointSelector: {}
"""


def test_split_documents_keys_by_kind_namespace_and_name():
    docs = split_documents("p.yaml", CNP, 3)
    assert [d.key for d in docs] == ["cnp/default/rule1", "ccnp/wide"]
    assert all(d.revision == 3 and d.source == "p.yaml" for d in docs)
    replaced = merge(docs, split_documents("q.yaml", CNP.split("---")[0], 4))
    assert [(d.key, d.revision) for d in replaced] == [("ccnp/wide", 3), ("cnp/default/rule1", 4)]
    keep, gone = remove(replaced, "rule1")
    assert gone == ["cnp/default/rule1"] and [d.key for d in keep] == ["ccnp/wide"]


@pytest.mark.parametrize(
    "text, reason",
    [
        ("kind: Pod\nmetadata: {name: x}\n", "not a policy kind"),
        ("kind: CiliumNetworkPolicy\nmetadata: {}\n", "needs a name"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_split_documents_rejects_what_cannot_be_stored(text, reason):
    with pytest.raises(ApiError, match=reason):
        split_documents("bad.yaml", text, 1)


def _flow(verdict, src, dst, l7=None, proto="TCP", event="L7"):
    flow = {
        "time": "2026-11-26T13:00:01.123456789Z",
        "verdict": verdict,
        "traffic_direction": "INGRESS",
        "source": {"identity": 300, "labels": src, "ip": "10.251.0.3", "pod_name": "tiefighter"},
        "destination": {"identity": 301, "labels": dst, "ip": "10.251.0.2"},
        "l4": {proto: {"source_port": 40000, "destination_port": 80}},
        "Summary": "HTTP/1.1 PUT /v1/exhaust-port" if l7 else "TCP Flags: SYN",
        "event_type": event,
    }
    if l7:
        flow["l7"] = l7
    return flow


def test_filters_match_labels_without_source_verdict_and_protocol():
    http = _flow("DROPPED", ["k8s:class=tiefighter"], ["k8s:class=deathstar"], {"http": {}})
    udp = _flow(
        "FORWARDED", ["k8s:class=xwing"], ["k8s:class=deathstar"], proto="UDP", event="L3_L4"
    )
    assert FlowFilter(verdict="DROPPED", from_labels=("class=tiefighter",)).matches(http)
    assert not FlowFilter(from_labels=("class=xwing",)).matches(http)
    assert FlowFilter(to_labels=("k8s:class=deathstar",)).matches(http)
    assert not FlowFilter(to_labels=("reserved:class=deathstar",)).matches(http)
    assert FlowFilter(protocol="http").matches(http) and not FlowFilter(protocol="http").matches(
        udp
    )
    assert FlowFilter(protocol="udp").matches(udp) and not FlowFilter(protocol="tcp").matches(udp)
    assert (
        FlowFilter.from_json(json.loads(json.dumps(FlowFilter(verdict="X").to_json()))).verdict
        == "X"
    )


def test_flow_log_keeps_last_n_and_fans_out_to_matching_subscribers():
    asyncio.run(_flow_log_case())


async def _flow_log_case():
    log = FlowLog(capacity=3)
    seen = []
    log.add_observer(seen.append)
    queue = log.subscribe(FlowFilter(verdict="DROPPED"))
    for i in range(5):
        log.ingest(_flow("DROPPED" if i % 2 else "FORWARDED", [], [], event="L3_L4") | {"n": i})
    assert [f["n"] for f in log.last(None, FlowFilter())] == [2, 3, 4]
    assert [f["n"] for f in log.last(1, FlowFilter())] == [4]
    assert [queue.get_nowait()["n"] for _ in range(queue.qsize())] == [1, 3]
    assert len(seen) == 5 and log.total == 5


def test_flow_log_takes_a_batch_like_single_flows():
    """ingest_many (the DNS proxy's batches): every flow kept, observed and queued in order, an
    unfiltered subscriber gets them all, a filtered one only its matches."""
    log = FlowLog(capacity=10)
    seen = []
    log.add_enricher(lambda f: f.setdefault("node_name", "n1"))
    log.add_observer(seen.append)
    every, dropped = log.subscribe(), log.subscribe(FlowFilter(verdict="DROPPED"))
    log.ingest_many(
        [
            _flow("DROPPED" if i % 2 else "FORWARDED", [], [], event="L3_L4") | {"n": i}
            for i in range(4)
        ]
    )
    log.ingest(_flow("DROPPED", [], [], event="L3_L4") | {"n": 4})
    assert [f["n"] for f in log.last(None, FlowFilter())] == [0, 1, 2, 3, 4]
    assert [f["n"] for f in seen] == [0, 1, 2, 3, 4] and log.total == 5
    assert all(f["node_name"] == "n1" for f in seen)
    assert [every.get_nowait()["n"] for _ in range(every.qsize())] == [0, 1, 2, 3, 4]
    assert [dropped.get_nowait()["n"] for _ in range(dropped.qsize())] == [1, 3, 4]


def test_node_proxy_flows_are_built_when_read_and_the_map_counts_them_unbuilt():
    """The node proxy's HTTP/1 flows go to the agent's log through DirectSink: the first of a
    connection is built (and enriched) at once, the rest stay unbuilt while nobody needs them
    as dicts; the live map counts them from their fields; `last` builds and enriches them, equal
    to what the proxy would have built at once; a subscriber makes them built at once."""
    from l7proxy.agent.node_proxy import DirectSink
    from l7proxy.depmap.graph import DepMap
    from tests.unit.http1.playbook import Play

    log = FlowLog(capacity=100)
    log.add_enricher(lambda f: f.update(node_name="n1"))  # (as the agent's does)
    counted = []
    log.add_observer(counted.append, l7=False)  # (the agent's metrics: L7 flows not counted)
    depmap = DepMap()
    log.add_observer(depmap.add, pending=depmap.add_pending)
    play = Play()
    play.session.ctx.flows = DirectSink(log)
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    for path in (b"/public/a", b"/private/b", b"/public/c", b"/public/d"):
        play.client_sends(b"GET " + path + b" HTTP/1.1\r\nHost: web\r\n\r\n")
        if path.startswith(b"/public/"):
            play.upstream_sends(ok)
    assert log.total == 4 and len(counted) == 1  # the first, built at once
    kept = list(log._flows)
    assert type(kept[0]) is dict and all(f._flow is None for f in kept[1:])  # unbuilt
    edge = next(iter(depmap.edges.values()))
    assert (edge.forwarded, edge.dropped, depmap.flows_seen) == (3, 1, 4)
    assert edge.drop_reasons == {"POLICY_DENIED": 1}
    flows = log.last(None, FlowFilter())
    assert [f["l7"]["http"]["url"] for f in flows] == ["/public/a", "/private/b", "/public/c",
                                                       "/public/d"]  # fmt: skip
    assert [f["verdict"] for f in flows] == ["FORWARDED", "DROPPED", "FORWARDED", "FORWARDED"]
    assert all(f["node_name"] == "n1" and f["source"] is flows[0]["source"] for f in flows)
    assert flows[1]["drop_reason_desc"] == "POLICY_DENIED" and flows[1]["l7"]["type"] == "REQUEST"
    assert flows[2]["Summary"].startswith("HTTP/1.1 200 ") and flows[2]["l7"]["http"]["code"] == 200
    assert [r["http"]["url"] for r in edge.to_dict()["recent"]][:2] == ["/public/d", "/public/c"]
    assert edge.to_dict()["last_seen"] == flows[-1]["time"]
    queue = log.subscribe()
    play.client_sends(b"GET /public/e HTTP/1.1\r\nHost: web\r\n\r\n")
    play.upstream_sends(ok)
    assert type(log._flows[-1]) is dict and queue.get_nowait()["l7"]["http"]["url"] == "/public/e"


def test_compact_line_reads_like_hubble():
    line = compact(_flow("DROPPED", [], [], {"type": "REQUEST", "http": {"code": 403}}))
    assert line == (
        "Nov 26 13:00:01.123: tiefighter:40000 (ID:300) -> 10.251.0.2:80 (ID:301) "
        "http-request DROPPED (HTTP/1.1 PUT /v1/exhaust-port)"
    )
    l4 = compact(_flow("DROPPED", [], [], event="L3_L4") | {"drop_reason_desc": "POLICY_DENIED"})
    assert "policy-verdict:none INGRESS DENIED (TCP Flags: SYN; POLICY_DENIED)" in l4
    out = table([_flow("FORWARDED", [], [], event="L3_L4")])
    assert out.splitlines()[0].split() == ["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]
    assert "tiefighter" in out.splitlines()[1] and "to-endpoint" in out


def test_table_collapse_folds_identical_rows_with_counts():
    a = _flow("DROPPED", [], [], event="L3_L4")
    b = _flow("FORWARDED", [], [], event="L3_L4")
    lines = table([a, b, a, b, a], collapse=True).splitlines()
    assert len(lines) == 3 and lines[1].endswith("(x3)") and lines[2].endswith("(x2)")
