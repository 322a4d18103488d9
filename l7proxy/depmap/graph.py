"""Aggregate Hubble-shaped flow dicts into a service dependency graph.

Pure: no I/O, no clock, no asyncio. The live map, `/map.json` and `l7proxy map` all feed flow
dicts (docs/contracts.md, "Flow shape") into one `DepMap` and read its `to_dict()`.

- A node is a group of identities: the endpoints with the same namespace and app label share one
  node, as Hubble UI's service cards do; an endpoint without an app label is its own node, keyed
  by its identity. Every world identity (reserved world, world-ipv4/6, CIDR identities) folds into
  one `world` node and the host into one `host` node.
- An edge is (source node, destination node, protocol, port) and counts forwarded, dropped,
  error and redirected flows, with a bounded ring of the most recent flows and their L7 details.
- Each node and edge remembers the map version that last changed it, so a live client asks only
  for what changed since the version it has (`changes_since`).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

HOST_ID = 1
WORLD_IDS = frozenset({2, 9, 10})
LOCAL_SCOPE_MIN = 1 << 24  # CIDR identities live in the local scope
NAMESPACE_KEY = "io.kubernetes.pod.namespace"
# The label keys that name an app, first match wins (Hubble UI reads the same kind of list).
APP_KEYS = ("app", "k8s-app", "app.kubernetes.io/name", "name", "class")

DEFAULT_RECENT = 20
DEFAULT_MAX_EDGES = 2000
CLASSIFY_CACHE = 4096
MAX_NODE_LABELS = 32
MAX_NODE_IDENTITIES = 64
MAX_PENDING_REQUESTS = 4096

FORWARDED, DROPPED, ERROR, REDIRECTED = "FORWARDED", "DROPPED", "ERROR", "REDIRECTED"


def split_label(text: str) -> tuple[str, str, str]:
    """`k8s:app=web` -> ("k8s", "app", "web"); `reserved:world` -> ("reserved", "world", "")."""
    head, _, value = text.partition("=")
    source, sep, key = head.partition(":")
    if not sep or "/" in source or "." in source:
        source, key = "", head
    return source, key, value


@dataclass(frozen=True, slots=True)
class Peer:
    """Where a node comes from: its key and how it is shown."""

    key: str
    kind: str  # "endpoint" | "world" | "host"
    name: str
    namespace: str


def classify(identity: int, labels: Sequence[str], namespace: str = "") -> Peer:
    """Map one side of a flow (identity and labels) to the node it belongs to.

    The namespace comes from the namespace label, else from Hubble's `namespace` field.
    """
    parsed = [split_label(label) for label in labels]
    sources_keys = {(s, k) for s, k, _ in parsed}
    if identity == HOST_ID or ("reserved", "host") in sources_keys:
        return Peer("host", "host", "host", "")
    world = (
        identity in WORLD_IDS
        or identity >= LOCAL_SCOPE_MIN
        or any(s == "reserved" and k.startswith("world") for s, k in sources_keys)
        or (not labels and identity == 0)
    )
    if world:
        return Peer("world", "world", "world", "")
    values = {}
    for _, key, value in parsed:
        values.setdefault(key, value)
    namespace = values.get(NAMESPACE_KEY) or namespace
    for key in APP_KEYS:
        if values.get(key):
            app = values[key]
            return Peer(f"{namespace}/{app}" if namespace else app, "endpoint", app, namespace)
    shown = ",".join(f"{k}={v}" if v else k for _, k, v in parsed if k != NAMESPACE_KEY)
    return Peer(f"id:{identity}", "endpoint", shown or f"identity {identity}", namespace)


@dataclass(slots=True)
class Node:
    peer: Peer
    version: int
    identities: set[int] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)

    def absorb(self, identity: int, labels: Sequence[str]) -> bool:
        """Add an identity and its labels (bounded); True when something was new."""
        if identity in self.identities:
            return False  # an identity's labels never change
        if len(self.identities) >= MAX_NODE_IDENTITIES:
            return False
        self.identities.add(identity)
        changed = True
        for label in labels:
            if label not in self.labels and len(self.labels) < MAX_NODE_LABELS:
                self.labels.add(label)
                changed = True
        return changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.peer.key,
            "kind": self.peer.kind,
            "name": self.peer.name,
            "namespace": self.peer.namespace,
            "identities": sorted(self.identities),
            "labels": sorted(self.labels),
        }


@dataclass(slots=True)
class Edge:
    source: str
    target: str
    protocol: str
    port: int
    version: int
    recent: deque
    forwarded: int = 0
    dropped: int = 0
    errors: int = 0
    redirected: int = 0
    last_seen: str = ""
    drop_reasons: dict[str, int] = field(default_factory=dict)
    # The newest flow when it came unbuilt (`add_pending`): last_seen is formatted when read.
    last_pending: Any = None

    @property
    def key(self) -> str:
        return edge_id(self.source, self.target, self.protocol, self.port)

    def to_dict(self, with_recent: bool = True) -> dict[str, Any]:
        out = {
            "id": self.key,
            "source": self.source,
            "target": self.target,
            "protocol": self.protocol,
            "port": self.port,
            "forwarded": self.forwarded,
            "dropped": self.dropped,
            "errors": self.errors,
            "redirected": self.redirected,
            "last_seen": self.last_pending.time_text()
            if self.last_pending is not None
            else self.last_seen,
            "drop_reasons": dict(sorted(self.drop_reasons.items())),
        }
        if with_recent:
            out["recent"] = [summarize(flow) for flow in reversed(self.recent)]  # newest first
        return out


def edge_id(source: str, target: str, protocol: str, port: int) -> str:
    return f"{source}->{target}:{protocol}/{port}"


def _side(side: dict) -> tuple[int, tuple[str, ...], str]:
    return (
        int(side.get("identity") or 0),
        tuple(str(label) for label in side.get("labels") or ()),
        str(side.get("namespace") or ""),
    )


def _l4_ports(flow: dict) -> tuple[str, int, int]:
    """(protocol, source port, destination port) from the `l4` member."""
    l4 = flow.get("l4") or {}
    for proto, body in l4.items():
        if isinstance(body, dict):
            return (
                proto.lower(),
                int(body.get("source_port") or 0),
                int(body.get("destination_port") or 0),
            )
    return "", 0, 0


def _protocol(flow: dict, l4_proto: str) -> str:
    l7 = flow.get("l7") or {}
    http = l7.get("http")
    if http:
        return "grpc" if http.get("grpc") else "http"
    for name in ("kafka", "dns"):
        if l7.get(name):
            return name
    return l4_proto or "unknown"


def summarize(flow) -> dict[str, Any]:
    """The compact record kept in an edge's ring of recent flows: the L7 details that matter.
    `flow` is a dict or a `PendingFlow` (l7proxy/flows.py), built now."""
    if type(flow) is not dict:
        flow = flow.flow()
    src = flow.get("source") or {}
    dst = flow.get("destination") or {}
    _, sport, dport = _l4_ports(flow)
    rec: dict[str, Any] = {
        "time": flow.get("time", ""),
        "verdict": flow.get("verdict", ""),
        "summary": flow.get("Summary", ""),
        "source": f"{src.get('ip', '')}:{sport}" if src.get("ip") else "",
        "destination": f"{dst.get('ip', '')}:{dport}" if dst.get("ip") else "",
    }
    if flow.get("drop_reason_desc"):
        rec["drop_reason"] = flow["drop_reason_desc"]
    l7 = flow.get("l7") or {}
    if l7:
        rec["type"] = l7.get("type", "")
        if l7.get("latency_ns"):
            rec["latency_ns"] = l7["latency_ns"]
    http = l7.get("http")
    if http:
        rec["http"] = {
            k: http[k]
            for k in ("method", "url", "code", "protocol", "grpc", "reset")
            if http.get(k) is not None
        }
    kafka = l7.get("kafka")
    if kafka:
        rec["kafka"] = {
            k: kafka[k]
            for k in ("api_key", "api_version", "topic", "error_code", "correlation_id")
            if kafka.get(k) is not None
        }
    return rec


def _tally(edge: Edge, verdict: str, drop_reason: str | None) -> None:
    if verdict == FORWARDED:
        edge.forwarded += 1
    elif verdict == DROPPED:
        edge.dropped += 1
        reason = drop_reason or "UNKNOWN"
        edge.drop_reasons[reason] = edge.drop_reasons.get(reason, 0) + 1
    elif verdict == ERROR:
        edge.errors += 1
    elif verdict == REDIRECTED:
        edge.redirected += 1


class DepMap:
    """The graph. Feed it with `add(flow)`; read it with `to_dict()` or `changes_since(v)`."""

    def __init__(self, recent: int = DEFAULT_RECENT, max_edges: int = DEFAULT_MAX_EDGES):
        self.recent = recent
        self.max_edges = max_edges
        self.version = 0
        self.flows_seen = 0
        self.flows_ignored = 0  # malformed, or over max_edges
        self.nodes: dict[str, Node] = {}
        self.edges: dict[str, Edge] = {}
        # Requests seen per client connection whose response flow is still to come, so that a
        # sink emitting both a REQUEST and a RESPONSE flow counts each request once.
        self._pending: OrderedDict[tuple, int] = OrderedDict()
        self._peers: dict[tuple, Peer] = {}  # classify() results; identities repeat a lot
        # (id(source), id(destination)) -> (source, destination, their classify() results)
        self._pairs: dict[tuple[int, int], tuple] = {}

    def add(self, flow: dict) -> bool:
        """Aggregate one flow. False when it was ignored (malformed or over the edge limit)."""
        self.flows_seen += 1
        try:
            return self._add(flow)
        except (TypeError, ValueError, AttributeError):
            self.flows_ignored += 1
            return False

    def add_all(self, flows) -> int:
        return sum(1 for flow in flows if self.add(flow))

    def _add(self, flow: dict) -> bool:
        src, dst = flow.get("source"), flow.get("destination")
        if not isinstance(src, dict) or not isinstance(dst, dict):
            self.flows_ignored += 1
            return False
        l4_proto, sport, dport = _l4_ports(flow)
        if flow.get("is_reply"):
            # A reply travels server -> client; the edge belongs to the client -> server direction.
            src, dst, sport, dport = dst, src, dport, sport
        # A proxy hands over the same two peer dicts with every flow of a connection: their
        # classification and their edges are looked up by identity (the entry holds both
        # dicts, so an id is never reused while it is cached; edges are never removed), and
        # their nodes have absorbed them already.
        protocol = _protocol(flow, l4_proto)
        pair_key = (id(src), id(dst))
        pair = self._pairs.get(pair_key)
        if pair is not None and pair[0] is src and pair[1] is dst:
            edge = pair[3].get((protocol, dport))
            if edge is None:
                src_peer, _, dst_peer, _ = pair[2]
                edge = self._edge(src_peer, dst_peer, protocol, dport)
                if edge is None:
                    return False
                pair[3][protocol, dport] = edge
            self.version += 1
        else:
            src_peer, src_side = self._classify(src)
            dst_peer, dst_side = self._classify(dst)
            edge = self._edge(src_peer, dst_peer, protocol, dport)
            if edge is None:
                return False
            self.version += 1
            version = self.version
            for peer, (identity, labels, _) in ((src_peer, src_side), (dst_peer, dst_side)):
                node = self.nodes.get(peer.key)
                if node is None:
                    node = self.nodes[peer.key] = Node(peer, version)
                if node.absorb(identity, labels):
                    node.version = version
            if len(self._pairs) >= CLASSIFY_CACHE:
                self._pairs.clear()
            classified = (src_peer, src_side, dst_peer, dst_side)
            self._pairs[pair_key] = (src, dst, classified, {(protocol, dport): edge})
        version = self.version

        l7_type = (flow.get("l7") or {}).get("type")
        verdict = flow.get("verdict", "")
        if self._counts(l7_type, verdict, (src.get("ip"), sport, dst.get("ip"), dport)):
            _tally(edge, verdict, flow.get("drop_reason_desc"))
        # The flow itself, summarized when read: the hot path stays cheap. Emitters hand over
        # a flow and never change it afterwards.
        edge.recent.append(flow)
        last = flow.get("time", "")
        if last:
            edge.last_seen, edge.last_pending = last, None
        edge.version = version
        return True

    def add_pending(self, pending) -> bool:
        """An HTTP flow of the node proxy not built yet (`HttpFlow`, l7proxy/http1/exchange.py):
        when its connection's peers and edge are known (from the connection's first flow, which
        comes built), it is counted from its fields and kept unbuilt in the edge's ring of
        recent flows, summarized when read; otherwise it is built and added as a dict."""
        src, dst, dport = pending.source, pending.destination, pending.dport
        pair = self._pairs.get((id(src), id(dst)))
        edge = None
        if pair is not None and pair[0] is src and pair[1] is dst:
            edge = pair[3].get(("http", dport))
        if edge is None:
            return self.add(pending.flow())
        self.flows_seen += 1
        self.version += 1
        verdict = pending.verdict
        if verdict == FORWARDED and not self._pending:
            edge.forwarded += 1  # (a RESPONSE flow, and no REQUEST flow waits for its response)
        elif self._counts(
            pending.l7_type, verdict, (src.get("ip"), pending.sport, dst.get("ip"), dport)
        ):
            _tally(edge, verdict, pending.drop_reason)
        edge.recent.append(pending)
        edge.last_pending = pending
        edge.version = self.version
        return True

    def _edge(self, src_peer: Peer, dst_peer: Peer, protocol: str, port: int) -> Edge | None:
        """The edge, made when new (at the map's version of the flow that makes it); None when
        the map is at max_edges (the flow is ignored)."""
        key = edge_id(src_peer.key, dst_peer.key, protocol, port)
        edge = self.edges.get(key)
        if edge is None:
            if len(self.edges) >= self.max_edges:
                self.flows_ignored += 1
                return None
            edge = Edge(
                src_peer.key, dst_peer.key, protocol, port, self.version + 1,
                deque(maxlen=self.recent),
            )  # fmt: skip
            self.edges[key] = edge
        return edge

    def _classify(self, side: dict) -> tuple[Peer, tuple]:
        key = _side(side)
        peer = self._peers.get(key)
        if peer is None:
            if len(self._peers) >= CLASSIFY_CACHE:
                self._peers.clear()
            peer = self._peers[key] = classify(*key)
        return peer, key

    def _counts(self, l7_type: str | None, verdict: str, conn: tuple) -> bool:
        """Whether this flow adds to the counts: each L7 request once, each L3/L4 event once.

        A REQUEST flow counts; a forwarded one also leaves a pending mark on its connection, since
        its response flow may follow. A RESPONSE flow counts only when no forwarded request on that
        connection is waiting for it (a sink that emits one flow per request at response time, as
        the gateway does; a denied request is a DROPPED REQUEST flow with no response flow). The
        pending table is bounded: the oldest marks go first.
        """
        if l7_type == "REQUEST":
            if verdict != FORWARDED:
                return True
            self._pending[conn] = self._pending.get(conn, 0) + 1
            self._pending.move_to_end(conn)
            while len(self._pending) > MAX_PENDING_REQUESTS:
                self._pending.popitem(last=False)
            return True
        if l7_type == "RESPONSE":
            waiting = self._pending.get(conn, 0)
            if waiting:
                if waiting == 1:
                    del self._pending[conn]
                else:
                    self._pending[conn] = waiting - 1
                return False
        return True

    def to_dict(self, with_recent: bool = True) -> dict[str, Any]:
        return {
            "version": self.version,
            "flows_seen": self.flows_seen,
            "flows_ignored": self.flows_ignored,
            "nodes": [n.to_dict() for n in sorted(self.nodes.values(), key=lambda n: n.peer.key)],
            "edges": [
                e.to_dict(with_recent) for e in sorted(self.edges.values(), key=lambda e: e.key)
            ],
        }

    def changes_since(self, version: int) -> dict[str, Any]:
        """Nodes and edges changed after `version` (all of them for version 0)."""
        return {
            "version": self.version,
            "flows_seen": self.flows_seen,
            "flows_ignored": self.flows_ignored,
            "nodes": [n.to_dict() for n in self.nodes.values() if n.version > version],
            "edges": [e.to_dict() for e in self.edges.values() if e.version > version],
        }
