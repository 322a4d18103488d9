"""Flows on the proxy worker's `proxy.flows` channel, in a compact form.

A proxy's flows repeat their connection: every flow of one client connection carries the same
two peer dicts (`ConnContext` builds them once). Sent as whole Hubble dicts, each flow cost the
worker a json.dumps and the agent a json.loads of ~580 bytes: about 12 us each, per request, on
the 2-core machine (docs/bench.md, "Node mode"). Here the peers go once per channel connection
(`{"peers": [ref, source, destination]}`), and the flows of one send go in one line as lists of
their remaining fields (`{"flows": [[ref, time, ...], ...]}`), about 100 bytes each.

The agent rebuilds each flow as the same dict (same keys, same order as `build_flow`), with the
peer dicts shared per connection as in the inline proxy, so its enrichment and the map see the
same thing in both modes. A flow of another shape goes whole (`{"flow": {...}}`), as before.

An HTTP/1 flow not built yet (`HttpFlow`, l7proxy/flows.py) goes as its fields and the agent
makes an `HttpFlow` of it again: neither side builds the dict unless the agent's log is read
(l7proxy/agent/flowlog.py). The fields that repeat from request to request (the peer pair,
verdict, direction, port, method, URL, version, status, logged header names) form a *shape*,
sent once per channel connection (`{"shapes": [[sid, ref, verdict, direction, dport, method,
url, version, status, [logged]], ...]}`); a run of HTTP flows is then one flat list of integers,
`{"http": [t0, sid, time_ns - t0, sport, latency_ns, sid, ...]}`, four per flow. Against one
row of all thirteen fields per flow this halved the worker's encoding (`Uplink.encode`, 1.76 ->
0.82 us per flow) and the agent's parse, decode and ingest (`WorkerHandle.uplink`, 2.13 -> 1.12
us), measured on 300-flow batches; JSON's strings and 19-digit integers were most of the agent's
time (`perf`). A worker from before this form sends `["http", ref, time_ns, verdict, direction,
sport, dport, method, url, version, status, latency_ns, [logged]]` rows in a `flows` line; the
agent still reads them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from l7proxy.flows import HttpFlow, as_text

# The fields of build_flow's dict, in its order; the optional ones last.
_FIXED = (
    "time",
    "verdict",
    "traffic_direction",
    "source",
    "destination",
    "l4",
    "Summary",
    "node_name",
    "event_type",
)
_OPTIONAL = ("drop_reason_desc", "l7")
_KNOWN = frozenset(_FIXED + _OPTIONAL)
_FIXED_SET = frozenset(_FIXED)
# Peer pairs (and HTTP shapes) a worker remembers per channel connection before it starts a
# fresh table; references only grow, and the agent keeps twice as many, so every reference a
# worker may still use is known to it.
MAX_PEERS = 4096
MAX_SHAPES = 4096


def _tcp_ports(flow: dict) -> tuple[int, int] | None:
    l4 = flow.get("l4")
    if type(l4) is not dict or len(l4) != 1:
        return None
    tcp = l4.get("TCP")
    if type(tcp) is not dict or len(tcp) != 2:
        return None
    sport, dport = tcp.get("source_port"), tcp.get("destination_port")
    if type(sport) is not int or type(dport) is not int:
        return None
    return sport, dport


class FlowEncoder:
    """The worker's side, one per channel connection (the agent's table starts empty)."""

    def __init__(self) -> None:
        self._refs: dict[tuple[int, int], tuple[int, dict, dict]] = {}
        self._next = 0
        self._shapes: dict[tuple, tuple[int, dict, dict]] = {}
        self._next_shape = 0

    def _ref(self, src: dict, dst: dict) -> tuple[int, dict | None]:
        """The reference of a peer pair, and the peers item to send first when it is new."""
        refs = self._refs
        key = (id(src), id(dst))
        entry = refs.get(key)
        if entry is not None and entry[1] is src and entry[2] is dst:
            return entry[0], None
        if len(refs) >= MAX_PEERS:
            refs.clear()
        self._next += 1
        refs[key] = (self._next, src, dst)  # holds both: ids stay unique
        return self._next, {"peers": [self._next, src, dst]}

    def http_shape(self, flow: HttpFlow) -> tuple[dict | None, list | None, int]:
        """(a peers item to send first or None, a new shape to send before the run that uses
        it or None, the shape's id) of an HTTP/1 flow not built."""
        src, dst = flow.source, flow.destination
        # (Keyed by the peer dicts' ids, checked to be the same dicts: one lookup per flow.)
        key = (id(src), id(dst), flow.verdict, flow.direction, flow.dport, flow.method,
               flow.url, flow.version, flow.status, flow.logged)  # fmt: skip
        known = self._shapes.get(key)
        if known is not None and known[1] is src and known[2] is dst:
            return None, None, known[0]
        ref, peers = self._ref(src, dst)
        if len(self._shapes) >= MAX_SHAPES:
            self._shapes.clear()
        self._next_shape += 1
        sid = self._next_shape
        self._shapes[key] = (sid, src, dst)  # holds both: ids stay unique
        return peers, [
            sid, ref, flow.verdict, flow.direction, flow.dport, as_text(flow.method),
            as_text(flow.url), as_text(flow.version), flow.status, list(flow.logged),
        ], sid  # fmt: skip

    def row(self, flow: dict) -> tuple[dict | None, list | None]:
        """(a peers item to send before it or None, the compact row), or (None, None) for a
        flow to send whole."""
        ports = _tcp_ports(flow)
        src, dst = flow.get("source"), flow.get("destination")
        if (
            ports is None
            or type(src) is not dict
            or type(dst) is not dict
            or not flow.keys() <= _KNOWN
            or not flow.keys() >= _FIXED_SET
        ):
            return None, None
        ref, peers = self._ref(src, dst)
        return peers, [
            ref,
            flow["time"],
            flow["verdict"],
            flow["traffic_direction"],
            ports[0],
            ports[1],
            flow["Summary"],
            flow["node_name"],
            flow["event_type"],
            flow.get("drop_reason_desc"),
            flow.get("l7"),
        ]


class FlowDecoder:
    """The agent's side, one per channel connection."""

    def __init__(self) -> None:
        self._peers: OrderedDict[int, tuple[dict, dict]] = OrderedDict()
        self._new: set[int] = set()  # peer pairs no HTTP row named yet
        # sid -> (ref, source, destination, dport, direction, verdict, method, url, version,
        # status, logged)
        self._shapes: OrderedDict[int, tuple] = OrderedDict()

    def peers(self, item: list) -> None:
        ref, src, dst = item
        if type(ref) is not int or type(src) is not dict or type(dst) is not dict:
            raise ValueError("bad peers item")
        self._peers[ref] = (src, dst)
        self._new.add(ref)
        while len(self._peers) > 2 * MAX_PEERS:
            self._new.discard(self._peers.popitem(last=False)[0])

    def _shape(
        self, ref, verdict, direction, dport, method, url, version, status, logged
    ) -> tuple:  # fmt: skip
        """The table entry of an HTTP shape; ValueError for one that does not fit."""
        pair = self._peers.get(ref)
        if pair is None:
            raise ValueError(f"unknown peers {ref!r}")
        if not (
            type(verdict) is str and type(direction) is str and type(dport) is int
            and type(method) is str and type(url) is str and type(version) is str
            and type(status) is int and type(logged) is list
            and all(type(name) is str for name in logged)
        ):  # fmt: skip
            raise ValueError("bad http shape")
        return (ref, pair[0], pair[1], dport, direction, verdict, method, url, version, status,
                tuple(logged))  # fmt: skip

    def shapes(self, items: list) -> None:
        """HTTP shapes (`{"shapes": [...]}`); ValueError for one that does not fit."""
        table = self._shapes
        for item in items:
            if type(item) is not list or len(item) != 10 or type(item[0]) is not int:
                raise ValueError("bad http shape")
            table[item[0]] = self._shape(*item[1:])
            while len(table) > 2 * MAX_SHAPES:
                table.popitem(last=False)

    def http_run(self, run: list) -> Iterator[HttpFlow]:
        """The flows of an `http` line, in order (`[t0, sid, dt, sport, latency, ...]`); a
        ValueError where one does not fit (the flows before it are kept)."""
        if not run or type(run[0]) is not int or len(run) % 4 != 1:
            raise ValueError("bad http run")
        t0, shapes, new = run[0], self._shapes, self._new
        for i in range(1, len(run), 4):
            sid, dt, sport, latency = run[i : i + 4]
            shape = shapes.get(sid)
            if shape is None or not (
                type(dt) is int and type(sport) is int and type(latency) is int
            ):
                raise ValueError(f"bad http flow (shape {sid!r})")
            ref = shape[0]
            first = ref in new
            if first:
                new.discard(ref)
            yield HttpFlow(
                shape[1], shape[2], sport, shape[3], shape[4], shape[5], shape[6], shape[7],
                shape[8], shape[9], latency, shape[10], t0 + dt, first,
            )  # fmt: skip

    def http(self, row: list) -> HttpFlow:
        """An HTTP/1 row of a worker from before shapes (all its fields) as an `HttpFlow` (the
        first of its peer pair marked `first`, as from `http_run`). ValueError for a row that
        does not fit."""
        (_, ref, time_ns, verdict, direction, sport, dport, method, url, version, status,
         latency, logged) = row  # fmt: skip
        shape = self._shape(ref, verdict, direction, dport, method, url, version, status, logged)
        if not (type(time_ns) is int and type(sport) is int and type(latency) is int):
            raise ValueError("bad http row")
        first = ref in self._new
        if first:
            self._new.discard(ref)
        return HttpFlow(
            shape[1], shape[2], sport, shape[3], shape[4], shape[5], shape[6], shape[7],
            shape[8], shape[9], latency, shape[10], time_ns, first,
        )  # fmt: skip

    def flow(self, row: list) -> dict:
        """One compact flow as its dict; ValueError for a row that does not fit."""
        ref, time, verdict, direction, sport, dport, summary, node, event, drop, l7 = row
        pair = self._peers.get(ref)
        if pair is None:
            raise ValueError(f"unknown peers {ref!r}")
        flow = {
            "time": time,
            "verdict": verdict,
            "traffic_direction": direction,
            "source": pair[0],
            "destination": pair[1],
            "l4": {"TCP": {"source_port": sport, "destination_port": dport}},
            "Summary": summary,
            "node_name": node,
            "event_type": event,
        }
        if drop is not None:
            flow["drop_reason_desc"] = drop
        if l7 is not None:
            flow["l7"] = l7
        return flow
