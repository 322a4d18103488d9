"""The agent's flow log: L3/L4 events from BPF and L7 flows from the proxy, in one stream.

Flows are Hubble-shaped dicts (docs/contracts.md). The log keeps the last `capacity` flows for
`observe --last N`, fans new ones out to `observe --follow` subscribers, and enriches each flow
with the endpoint names it knows (Hubble's `pod_name`). Filters and the compact one-line form
live here so the CLI and the demo print flows the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from l7proxy.flows import PendingFlow

VERDICTS = ("FORWARDED", "DROPPED", "REDIRECTED", "ERROR")
PROTOCOLS = ("http", "kafka", "tcp", "udp")


@dataclass(frozen=True, slots=True)
class FlowFilter:
    verdict: str | None = None
    from_labels: tuple[str, ...] = ()
    to_labels: tuple[str, ...] = ()
    protocol: str | None = None

    @classmethod
    def from_json(cls, obj: dict | None) -> FlowFilter:
        obj = obj or {}
        return cls(
            verdict=obj.get("verdict"),
            from_labels=tuple(obj.get("from_labels") or ()),
            to_labels=tuple(obj.get("to_labels") or ()),
            protocol=obj.get("protocol"),
        )

    def to_json(self) -> dict:
        return {
            "verdict": self.verdict,
            "from_labels": list(self.from_labels),
            "to_labels": list(self.to_labels),
            "protocol": self.protocol,
        }

    def matches(self, flow: dict) -> bool:
        if not (self.verdict or self.protocol or self.from_labels or self.to_labels):
            return True  # no criteria (the live map, a plain `observe --follow`)
        if self.verdict and flow.get("verdict") != self.verdict:
            return False
        if self.protocol and not _has_protocol(flow, self.protocol):
            return False
        src = (flow.get("source") or {}).get("labels") or ()
        dst = (flow.get("destination") or {}).get("labels") or ()
        return all(_label_in(want, src) for want in self.from_labels) and all(
            _label_in(want, dst) for want in self.to_labels
        )


def _strip_source(label: str) -> str:
    head, sep, value = label.partition("=")
    key = head.split(":", 1)[1] if ":" in head and "/" not in head.split(":", 1)[0] else head
    return f"{key}{sep}{value}"


def _label_in(want: str, labels: Iterable[str]) -> bool:
    """`k=v` matches `k8s:k=v` (a filter without a source matches any source, like selectors)."""
    want_bare = _strip_source(want)
    has_source = _strip_source(want) != want
    for label in labels:
        if label == want or (not has_source and _strip_source(label) == want_bare):
            return True
    return False


def _has_protocol(flow: dict, protocol: str) -> bool:
    l7 = flow.get("l7") or {}
    l4 = flow.get("l4") or {}
    if protocol == "http":
        return "http" in l7
    if protocol == "kafka":
        return "kafka" in l7
    return protocol.upper() in l4


class FlowLog:
    """The flows kept are dicts, or `PendingFlow`s (l7proxy/flows.py) from the node proxy: an L7
    flow nobody reads as it comes (no `observe --follow`, no live map) is kept unbuilt, and is
    built and enriched when `last` first reads it. The first flow of each connection is built
    at once, which enriches the peer dicts the connection's flows share: a later flow names
    the same pods even when one is gone by the time it is read."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._flows: deque[dict | PendingFlow] = deque(maxlen=capacity)
        self._subscribers: list[tuple[FlowFilter, asyncio.Queue]] = []
        self._enrichers: list[Callable[[dict], None]] = []
        self._observers: list[Callable[[dict], None]] = []
        # How each observer takes a PendingFlow: its own callable, None (it skips L7 flows),
        # or absent (it needs the dict: while there is such an observer, flows are built).
        self._on_pending: dict[Callable, Callable | None] = {}
        self._pending_observers: list[Callable] = []
        self._eager = 0
        self.total = 0

    def add_enricher(self, fn: Callable[[dict], None]) -> None:
        self._enrichers.append(fn)

    def add_observer(
        self, fn: Callable[[dict], None], l7: bool = True, pending: Callable | None = None
    ) -> None:
        """Called once per flow after enrichment (metrics count flows here). For the node
        proxy's flows kept unbuilt: `pending(flow)` is called with the PendingFlow instead;
        `l7=False` says `fn` ignores L7 flows (it is not called for them). Without either, every
        flow is built at once while `fn` observes."""
        self._observers.append(fn)
        if pending is not None:
            self._on_pending[fn] = pending
        elif not l7:
            self._on_pending[fn] = None
        else:
            self._eager += 1
        self._pending_observers = [p for p in self._on_pending.values() if p is not None]

    def remove_observer(self, fn: Callable[[dict], None]) -> None:
        if fn in self._observers:
            self._observers.remove(fn)
            if fn in self._on_pending:
                del self._on_pending[fn]
            else:
                self._eager -= 1
            self._pending_observers = [p for p in self._on_pending.values() if p is not None]

    def ingest(self, flow: dict) -> None:
        self.ingest_many((flow,))

    def ingest_pending(self, pending: PendingFlow) -> None:
        """An L7 flow of the node proxy: built now only when someone needs it as a dict now."""
        if pending.first or self._subscribers or self._eager:
            self.ingest_many((pending.flow(),))
            return
        self._flows.append(pending)
        self.total += 1
        for observe in self._pending_observers:
            observe(pending)

    def _read(self, item: dict | PendingFlow) -> dict:
        if type(item) is dict:
            return item
        flow = item.flow()
        if not item.enriched:
            item.enriched = True
            for enrich in self._enrichers:
                enrich(flow)
        return flow

    def ingest_many(self, flows: Iterable[dict]) -> None:
        """Several flows in one go (the DNS proxy hands over a batch every few milliseconds):
        each is enriched, kept and counted as by ingest(), and a subscriber's queue gets them in
        a row, so its reader wakes once per batch rather than once per flow."""
        enrichers, observers, subscribers = self._enrichers, self._observers, self._subscribers
        for flow in flows:
            for enrich in enrichers:
                enrich(flow)
            self._flows.append(flow)
            self.total += 1
            for observe in observers:
                observe(flow)
            for flt, queue in subscribers:
                if flt.matches(flow):
                    try:
                        queue.put_nowait(flow)
                    except asyncio.QueueFull:
                        pass  # a slow observer loses flows; the datapath never waits for it

    def last(self, n: int | None, flt: FlowFilter) -> list[dict]:
        read = self._read
        matched = [f for f in map(read, self._flows) if flt.matches(f)]
        return matched if n is None else matched[-n:] if n > 0 else []

    def subscribe(self, flt: FlowFilter | None = None, maxsize: int = 10_000) -> asyncio.Queue:
        """A bounded queue of new flows (FlowSink-compatible, so the live map can attach)."""
        queue: asyncio.Queue = asyncio.Queue(maxsize)
        self._subscribers.append((flt or FlowFilter(), queue))
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._subscribers = [(f, q) for f, q in self._subscribers if q is not queue]


# Compact output, one line per flow like `hubble observe`.


def _peer(ep: dict, port: int | None) -> str:
    name = ep.get("pod_name") or ep.get("ip") or "?"
    if ep.get("container_id"):  # a container endpoint: name it as its runtime does
        name = f"{name}[{ep.get('runtime') or 'cni'}:{ep['container_id']}]"
    where = f"{name}:{port}" if port else name
    ident = ep.get("identity")
    return f"{where} (ID:{ident})" if ident is not None else where


def _ports(flow: dict) -> tuple[int | None, int | None]:
    for proto in ("TCP", "UDP"):
        l4 = (flow.get("l4") or {}).get(proto)
        if l4:
            return l4.get("source_port"), l4.get("destination_port")
    return None, None


def _stamp(flow: dict) -> str:
    text = flow.get("time") or ""
    try:
        secs = time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S")
        frac = text[20:23] if len(text) > 22 else "000"
        return time.strftime("%b %d %H:%M:%S", secs) + f".{frac}"
    except ValueError:
        return text


def kind(flow: dict) -> str:
    l7 = flow.get("l7")
    if l7:
        proto = "http" if "http" in l7 else "kafka" if "kafka" in l7 else "l7"
        return f"{proto}-{str(l7.get('type', 'request')).lower()}"
    if flow.get("verdict") == "DROPPED":
        return f"policy-verdict:none {flow.get('traffic_direction', '')}".strip()
    if flow.get("verdict") == "REDIRECTED":
        return "to-proxy"
    return "to-endpoint"


def compact(flow: dict) -> str:
    sport, dport = _ports(flow)
    verdict = flow.get("verdict", "?")
    if verdict == "DROPPED" and not flow.get("l7"):
        verdict = "DENIED"
    detail = flow.get("Summary") or ""
    reason = flow.get("drop_reason_desc")
    if reason and reason not in detail:
        detail = f"{detail}; {reason}" if detail else reason
    return (
        f"{_stamp(flow)}: {_peer(flow.get('source') or {}, sport)} -> "
        f"{_peer(flow.get('destination') or {}, dport)} {kind(flow)} {verdict} ({detail})"
    )


def table(flows: list[dict], collapse: bool = False) -> str:
    """A fixed-width table for the end of the demo; `collapse` folds identical rows into the
    first one with a count (a Kafka client retrying a denied Metadata request makes thousands)."""
    rows = [("SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY")]
    for flow in flows:
        sport, dport = _ports(flow)
        src = flow.get("source") or {}
        dst = flow.get("destination") or {}
        rows.append(
            (
                str(src.get("pod_name") or src.get("ip") or "?"),
                f"{dst.get('pod_name') or dst.get('ip') or '?'}:{dport or ''}",
                kind(flow),
                str(flow.get("verdict", "?")),
                str(flow.get("Summary") or flow.get("drop_reason_desc") or ""),
            )
        )
    if collapse:
        counts: dict[tuple, int] = {}
        for row in rows[1:]:
            counts[row] = counts.get(row, 0) + 1  # dicts keep first-seen order
        rows = [rows[0]] + [r if n == 1 else (*r[:4], f"{r[4]}  (x{n})") for r, n in counts.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = []
    for row in rows:
        cells = [row[i].ljust(widths[i]) for i in range(4)]
        out.append("  ".join(cells) + "  " + row[4])
    return "\n".join(out)
