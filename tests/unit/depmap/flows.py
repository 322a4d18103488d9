"""Flow dicts in the shape of docs/contracts.md, for the depmap tests."""

from __future__ import annotations

DEATHSTAR = (1001, ["k8s:org=empire", "k8s:class=deathstar"])
TIEFIGHTER = (1002, ["k8s:org=empire", "k8s:class=tiefighter"])
XWING = (1003, ["k8s:org=alliance", "k8s:class=xwing"])
WORLD = (2, ["reserved:world"])


def http_flow(
    src=TIEFIGHTER,
    dst=DEATHSTAR,
    *,
    verdict="FORWARDED",
    method="POST",
    url="/v1/request-landing",
    code=200,
    port=80,
    sport=40000,
    l7_type="REQUEST",
    time="2026-11-26T13:00:00.000000000Z",
):
    flow = {
        "time": time,
        "verdict": verdict,
        "traffic_direction": "INGRESS",
        "source": {"identity": src[0], "labels": list(src[1]), "ip": "10.0.0.2"},
        "destination": {"identity": dst[0], "labels": list(dst[1]), "ip": "10.0.0.1"},
        "l4": {"TCP": {"source_port": sport, "destination_port": port}},
        "l7": {
            "type": l7_type,
            "latency_ns": 1000,
            "http": {"code": code, "method": method, "url": url, "protocol": "HTTP/1.1"},
        },
        "Summary": f"HTTP/1.1 {method} {url}",
        "node_name": "l7proxy",
        "event_type": "L7",
    }
    if verdict == "DROPPED":
        flow["drop_reason_desc"] = "POLICY_DENIED"
    return flow


def kafka_flow(src, dst, *, api_key="produce", topic="empire-announce", verdict="FORWARDED"):
    flow = http_flow(src, dst, verdict=verdict, port=9092)
    flow["l7"] = {
        "type": "REQUEST",
        "kafka": {"api_key": api_key, "api_version": 9, "correlation_id": 7, "topic": topic},
    }
    flow["Summary"] = f"Kafka {api_key} {topic}"
    return flow


def l4_flow(src, dst, *, verdict="DROPPED", port=80):
    return {
        "time": "2026-11-26T13:00:01Z",
        "verdict": verdict,
        "drop_reason_desc": "POLICY_DENIED" if verdict == "DROPPED" else "",
        "source": {"identity": src[0], "labels": list(src[1]), "ip": "10.0.0.3"},
        "destination": {"identity": dst[0], "labels": list(dst[1]), "ip": "10.0.0.1"},
        "l4": {"TCP": {"source_port": 41000, "destination_port": port}},
        "Summary": "TCP Flags: SYN",
        "event_type": "L3_L4",
    }
