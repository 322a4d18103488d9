from l7proxy.depmap.dot import to_dot
from l7proxy.depmap.graph import DepMap, classify, split_label

from .flows import DEATHSTAR, TIEFIGHTER, WORLD, XWING, http_flow, kafka_flow, l4_flow


def edge(graph, source, target):
    found = [e for e in graph["edges"] if e["source"] == source and e["target"] == target]
    assert len(found) == 1, graph["edges"]
    return found[0]


def test_split_label_handles_sources_and_bare_keys():
    assert split_label("k8s:app=web") == ("k8s", "app", "web")
    assert split_label("reserved:world") == ("reserved", "world", "")
    assert split_label("app=web") == ("", "app", "web")
    assert split_label("app.kubernetes.io/name=web") == ("", "app.kubernetes.io/name", "web")


def test_classify_folds_world_and_host_and_groups_by_namespace_and_app():
    assert classify(2, ["reserved:world"]).key == "world"
    assert classify(9, []).key == "world"
    assert classify((1 << 24) + 5, ["cidr:10.0.0.0/8"]).key == "world"
    assert classify(1, ["reserved:host"]).key == "host"
    web = classify(300, ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"])
    assert (web.key, web.name, web.namespace) == ("shop/web", "web", "shop")
    # A second identity of the same app in the same namespace lands on the same node.
    assert (
        classify(301, ["k8s:app=web", "k8s:version=2", "k8s:io.kubernetes.pod.namespace=shop"])
        == web
    )
    assert classify(302, ["k8s:app=web"]).key == "web"
    # Hubble's `namespace` field stands in when no namespace label is there.
    assert classify(303, ["k8s:app=db"], "shop").key == "shop/db"
    anon = classify(400, ["k8s:team=a"])
    assert (anon.key, anon.name) == ("id:400", "team=a")


def test_counts_forwarded_and_dropped_per_edge():
    m = DepMap()
    for i in range(3):
        m.add(http_flow(TIEFIGHTER, DEATHSTAR, sport=40000 + i))
    m.add(
        http_flow(
            TIEFIGHTER, DEATHSTAR, verdict="DROPPED", method="PUT", url="/v1/exhaust-port", code=403
        )
    )
    m.add(l4_flow(XWING, DEATHSTAR))
    g = m.to_dict()
    assert sorted(n["id"] for n in g["nodes"]) == ["deathstar", "tiefighter", "xwing"]
    tie = edge(g, "tiefighter", "deathstar")
    assert (tie["protocol"], tie["port"], tie["forwarded"], tie["dropped"]) == ("http", 80, 3, 1)
    assert tie["drop_reasons"] == {"POLICY_DENIED": 1}
    xw = edge(g, "xwing", "deathstar")
    assert (xw["protocol"], xw["forwarded"], xw["dropped"]) == ("tcp", 0, 1)
    assert g["version"] == 5 and g["flows_seen"] == 5


def test_recent_ring_is_bounded_newest_first_with_l7_details():
    m = DepMap(recent=3)
    for i in range(5):
        m.add(http_flow(url=f"/v1/{i}", sport=41000 + i))
    m.add(kafka_flow(TIEFIGHTER, DEATHSTAR, topic="deathstar-plans"))
    g = m.to_dict()
    assert len(g["edges"]) == 2  # kafka is a separate edge (protocol and port differ)
    http_edge = next(e for e in g["edges"] if e["protocol"] == "http")
    assert [r["http"]["url"] for r in http_edge["recent"]] == ["/v1/4", "/v1/3", "/v1/2"]
    assert http_edge["recent"][0]["http"] == {
        "method": "POST",
        "url": "/v1/4",
        "code": 200,
        "protocol": "HTTP/1.1",
    }
    assert http_edge["forwarded"] == 5
    kafka_edge = next(e for e in g["edges"] if e["protocol"] == "kafka")
    assert kafka_edge["port"] == 9092
    assert kafka_edge["recent"][0]["kafka"]["api_key"] == "produce"
    assert kafka_edge["recent"][0]["kafka"]["topic"] == "deathstar-plans"


def test_request_and_response_flows_count_one_request():
    m = DepMap()
    m.add(http_flow(sport=42000, l7_type="REQUEST"))
    m.add(http_flow(sport=42000, l7_type="RESPONSE"))
    # A sink that emits only the response flow still counts each request.
    m.add(http_flow(sport=42001, l7_type="RESPONSE"))
    m.add(http_flow(sport=42001, l7_type="RESPONSE"))
    # As the gateway does on one keep-alive connection: a denied request (a DROPPED REQUEST flow,
    # no response flow), then an allowed one (a RESPONSE flow only). Both count.
    m.add(http_flow(sport=42002, l7_type="REQUEST", verdict="DROPPED", code=403))
    m.add(http_flow(sport=42002, l7_type="RESPONSE"))
    e = m.to_dict()["edges"][0]
    assert (e["forwarded"], e["dropped"]) == (4, 1)
    assert len(e["recent"]) == 6


def test_reply_flows_are_turned_to_the_client_to_server_edge():
    m = DepMap()
    reply = http_flow(DEATHSTAR, TIEFIGHTER, sport=80, port=42000, l7_type="RESPONSE")
    reply["is_reply"] = True
    m.add(reply)
    e = m.to_dict()["edges"][0]
    assert (e["source"], e["target"], e["port"]) == ("tiefighter", "deathstar", 80)


def test_world_sources_share_one_node_and_malformed_flows_are_ignored():
    m = DepMap()
    m.add(http_flow(WORLD, DEATHSTAR))
    m.add(http_flow(((1 << 24) + 1, ["cidr:192.0.2.0/24"]), DEATHSTAR, verdict="DROPPED"))
    assert m.add({"source": {"identity": "x"}, "destination": {}}) is False
    assert m.add({"verdict": "FORWARDED"}) is False
    g = m.to_dict()
    e = edge(g, "world", "deathstar")
    assert (e["forwarded"], e["dropped"]) == (1, 1)
    world = next(n for n in g["nodes"] if n["id"] == "world")
    assert world["kind"] == "world" and world["identities"] == [2, (1 << 24) + 1]
    assert g["flows_ignored"] == 2


def test_edge_limit_drops_new_edges_but_keeps_counting_old_ones():
    m = DepMap(max_edges=1)
    assert m.add(http_flow(TIEFIGHTER, DEATHSTAR))
    assert not m.add(http_flow(XWING, DEATHSTAR))
    assert m.add(http_flow(TIEFIGHTER, DEATHSTAR, sport=1))
    g = m.to_dict()
    assert len(g["edges"]) == 1 and g["edges"][0]["forwarded"] == 2 and g["flows_ignored"] == 1


def test_changes_since_returns_only_what_changed():
    m = DepMap()
    m.add(http_flow(TIEFIGHTER, DEATHSTAR))
    v = m.version
    assert len(m.changes_since(0)["edges"]) == 1
    assert m.changes_since(v)["edges"] == [] and m.changes_since(v)["nodes"] == []
    m.add(l4_flow(XWING, DEATHSTAR))
    delta = m.changes_since(v)
    assert [e["source"] for e in delta["edges"]] == ["xwing"]
    assert [n["id"] for n in delta["nodes"]] == ["xwing"]  # deathstar did not change
    m.add(http_flow(TIEFIGHTER, DEATHSTAR, sport=9))
    assert [e["forwarded"] for e in m.changes_since(delta["version"])["edges"]] == [2]


def test_dot_output_has_clusters_labels_and_red_drops():
    m = DepMap()
    web = (300, ["k8s:app=web", "k8s:io.kubernetes.pod.namespace=shop"])
    m.add(http_flow(WORLD, web))
    m.add(http_flow(TIEFIGHTER, web, verdict="DROPPED", code=403))
    dot = to_dot(m.to_dict())
    assert dot.startswith("digraph depmap {") and dot.rstrip().endswith("}")
    assert 'label="namespace shop"' in dot
    assert '"shop/web" [label="web", shape=box];' in dot
    assert '"world" [label="world", shape=ellipse];' in dot
    assert '"tiefighter" -> "shop/web" [label="http/80\\nforwarded 0\\ndropped 1", color=red' in dot
    assert '"world" -> "shop/web" [label="http/80\\nforwarded 1\\ndropped 0", color=black' in dot


def test_grpc_flows_make_a_grpc_edge_with_method_and_status():
    m = DepMap()
    flow = http_flow(method="POST", url="/deathstar.Exhaust/Fire", code=200, port=50051)
    flow["l7"]["http"]["protocol"] = "HTTP/2"
    flow["l7"]["http"]["grpc"] = {
        "method": "/deathstar.Exhaust/Fire",
        "status_code": 7,
        "status": "PERMISSION_DENIED",
    }
    m.add(flow)
    e = m.to_dict()["edges"][0]
    assert (e["protocol"], e["port"]) == ("grpc", 50051)
    assert e["recent"][0]["http"]["grpc"]["status"] == "PERMISSION_DENIED"
    assert e["recent"][0]["http"]["protocol"] == "HTTP/2"


def test_flows_sharing_a_connections_peer_dicts_count_per_edge_as_separate_dicts_do():
    """A proxy hands over the same two peer dicts with every flow of a connection; the map
    caches their classification and edges by identity, and must count exactly as for copies."""
    shared = http_flow(TIEFIGHTER, DEATHSTAR)
    src, dst = shared["source"], shared["destination"]

    def same_peers(**kw):
        flow = http_flow(TIEFIGHTER, DEATHSTAR, **kw)
        flow["source"], flow["destination"] = src, dst
        return flow

    kinds = [{}, {"verdict": "DROPPED", "code": 403}, {"port": 8080}, {}, {"port": 8080}]
    cached, fresh = DepMap(), DepMap()
    for kw in kinds:
        cached.add(same_peers(**kw))
        fresh.add(http_flow(TIEFIGHTER, DEATHSTAR, **kw))
    assert cached.to_dict(with_recent=False) == fresh.to_dict(with_recent=False)
    g = cached.to_dict(with_recent=False)
    assert [(e["port"], e["forwarded"], e["dropped"]) for e in g["edges"]] == [
        (80, 2, 1),
        (8080, 2, 0),
    ]
    # At the edge limit a cached pair's new edge is refused too, and the old ones still count.
    small = DepMap(max_edges=1)
    small.add(same_peers())
    small.add(same_peers(port=8080))
    small.add(same_peers())
    edges = small.to_dict(with_recent=False)["edges"]
    assert [(e["port"], e["forwarded"]) for e in edges] == [(80, 2)]
    assert small.flows_ignored == 1
