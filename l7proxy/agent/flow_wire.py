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
"""

from __future__ import annotations

from collections import OrderedDict

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
# Peer pairs a worker remembers per channel connection before it starts a fresh table; the agent
# keeps twice as many, so every reference a worker may still use is known to it.
MAX_PEERS = 4096


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
        refs = self._refs
        key = (id(src), id(dst))
        entry = refs.get(key)
        peers = None
        if entry is None or entry[1] is not src or entry[2] is not dst:
            if len(refs) >= MAX_PEERS:
                refs.clear()
            self._next += 1
            entry = refs[key] = (self._next, src, dst)  # holds both: ids stay unique
            peers = {"peers": [self._next, src, dst]}
        return peers, [
            entry[0],
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

    def peers(self, item: list) -> None:
        ref, src, dst = item
        if type(ref) is not int or type(src) is not dict or type(dst) is not dict:
            raise ValueError("bad peers item")
        self._peers[ref] = (src, dst)
        while len(self._peers) > 2 * MAX_PEERS:
            self._peers.popitem(last=False)

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
