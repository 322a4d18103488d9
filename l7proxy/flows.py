"""Flow records in Hubble's JSON shape: one line per L7 request, fanned out to subscribers.

`FlowSink.emit` writes to the flow log (a file or stdout) and hands the dict to every subscriber
queue (the live dependency map, `observe`). A slow subscriber loses flows rather than slowing the
proxy: its queue is bounded and full queues drop. Writes are buffered and flushed once per event
loop turn, so a burst of requests costs one write(2).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import IO

FORWARDED = "FORWARDED"
DROPPED = "DROPPED"
REDIRECTED = "REDIRECTED"
ERROR = "ERROR"

SUBSCRIBER_QUEUE_SIZE = 10_000


_second: tuple[int, str] = (-1, "")  # the last second formatted (flows come in bursts)


def rfc3339_nano(ns: int | None = None) -> str:
    global _second
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    last = _second  # one read: a tuple swapped whole is safe for other threads
    if last[0] != secs:
        last = _second = (secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)))
    return f"{last[1]}.{frac:09d}Z"


def endpoint(identity: int, labels, ip: str | None = None) -> dict:
    out = {"identity": int(identity), "labels": [str(lb) for lb in labels]}
    if ip is not None:
        out["ip"] = ip
    return out


def build_flow(
    *,
    verdict: str,
    source: dict,
    destination: dict,
    source_port: int,
    destination_port: int,
    l7: dict | None,
    summary: str,
    direction: str = "INGRESS",
    drop_reason: str | None = None,
    event_type: str = "L7",
    time_ns: int | None = None,
) -> dict:
    flow = {
        "time": rfc3339_nano(time_ns),
        "verdict": verdict,
        "traffic_direction": direction,
        "source": source,
        "destination": destination,
        "l4": {"TCP": {"source_port": source_port, "destination_port": destination_port}},
        "Summary": summary,
        "node_name": "l7proxy",
        "event_type": event_type,
    }
    if drop_reason:
        flow["drop_reason_desc"] = drop_reason
    if l7 is not None:
        flow["l7"] = l7
    return flow


class PendingFlow:
    """A flow whose dict is built only when someone reads it (`FlowSink.emit_pending`): the
    agent keeps thousands of flows for `observe --last` that nobody may ever ask for, and on
    the request path building one costs more than the proxy's own work (docs/bench.md, "Node
    mode"). Subclasses keep what they need and implement `_build`. `first`: the first flow of
    its connection (the agent builds that one at once, which names the connection's peers)."""

    __slots__ = ("first", "enriched", "_flow")

    def __init__(self, first: bool = False) -> None:
        self.first = first
        self.enriched = False  # (the agent's flow log enriches a flow once, when it reads it)
        self._flow: dict | None = None

    def flow(self) -> dict:
        """The flow's dict, built once."""
        flow = self._flow
        if flow is None:
            flow = self._flow = self._build()
        return flow

    def _build(self) -> dict:
        raise NotImplementedError


def as_text(value: bytes | str) -> str:
    """A request field as text: the session keeps bytes, a worker's flow comes with strings."""
    return value if type(value) is str else value.decode("latin-1")


class HttpFlow(PendingFlow):
    """The flow of one answered HTTP/1 request, built when read. The session keeps the
    request's bytes (decoded only at build time); a worker's flow sent to the agent
    (l7proxy/agent/flow_wire.py) comes back with strings."""

    __slots__ = (
        "source", "destination", "sport", "dport", "direction", "verdict", "method", "url",
        "version", "status", "latency", "logged", "time_ns",
    )  # fmt: skip

    def __init__(
        self, source: dict, destination: dict, sport: int, dport: int, direction: str,
        verdict: str, method: bytes | str, url: bytes | str, version: bytes | str, status: int,
        latency: int, logged: tuple[str, ...], time_ns: int, first: bool = False,
    ) -> None:  # fmt: skip
        super().__init__(first)
        self.source, self.destination = source, destination
        self.sport, self.dport, self.direction = sport, dport, direction
        self.verdict = verdict
        self.method, self.url, self.version = method, url, version
        self.status = status
        self.latency = latency  # ns
        self.logged = logged  # LOG mismatches: header names only, never values (secrets)
        self.time_ns = time_ns

    @property
    def l7_type(self) -> str:
        return "RESPONSE" if self.verdict == FORWARDED else "REQUEST"

    @property
    def drop_reason(self) -> str | None:
        return "POLICY_DENIED" if self.verdict == DROPPED else None

    def time_text(self) -> str:
        return rfc3339_nano(self.time_ns)

    def _build(self) -> dict:
        method, url, version = as_text(self.method), as_text(self.url), as_text(self.version)
        status, latency = self.status, self.latency
        l7 = {
            "type": self.l7_type,
            "latency_ns": latency,
            "http": {
                "code": status,
                "method": method,
                "url": url,
                "protocol": "HTTP/" + version,
                # LOG mismatches name the header; its value may be a secret and is never logged.
                "headers": [{"key": name, "value": "[mismatch]"} for name in self.logged],
            },
        }
        return build_flow(
            verdict=self.verdict,
            source=self.source,
            destination=self.destination,
            source_port=self.sport,
            destination_port=self.dport,
            l7=l7,
            summary=f"HTTP/{version} {status} {latency // 1_000_000}ms ({method} {url})",
            direction=self.direction,
            drop_reason=self.drop_reason,
            time_ns=self.time_ns,
        )


class FlowSink:
    """Writes flows as JSON lines (to `path`, "-" for stdout, None for nowhere) and fans out."""

    def __init__(self, path: str | None = None, stream: IO[str] | None = None) -> None:
        self._own = False
        if stream is not None:
            self._out = stream
        elif path == "-":
            self._out = sys.stdout
        elif path:
            self._out = open(path, "a", buffering=1 << 20)  # noqa: SIM115 (closed in close())
            self._own = True
        else:
            self._out = None
        self._subscribers: list[asyncio.Queue] = []
        self._lines: list[str] = []
        self._flush_pending = False
        self._update_active()

    def _update_active(self) -> None:
        # `active` is False when nobody would see a flow: sessions then skip building it.
        # A plain attribute, read once per request.
        self.active = self._out is not None or bool(self._subscribers)

    def emit(self, flow: dict) -> None:
        if self._out is not None:
            self._lines.append(json.dumps(flow, separators=(",", ":")) + "\n")
            self._schedule_flush()
        for queue in self._subscribers:
            try:
                queue.put_nowait(flow)
            except asyncio.QueueFull:
                pass

    def emit_pending(self, pending: PendingFlow) -> None:
        """A flow built only when read: this sink writes every flow, so it builds it now."""
        self.emit(pending.flow())

    def subscribe(self, maxsize: int = SUBSCRIBER_QUEUE_SIZE) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize)
        self._subscribers.append(queue)
        self._update_active()
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        if queue in self._subscribers:
            self._subscribers.remove(queue)
        self._update_active()

    def _schedule_flush(self) -> None:
        if self._flush_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_pending = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """One write of whole lines: several workers appending to one file never interleave
        inside a line (O_APPEND writes are atomic for a regular file)."""
        self._flush_pending = False
        if self._out is not None and self._lines:
            data = "".join(self._lines)
            self._lines.clear()
            try:
                self._out.write(data)
                self._out.flush()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self.flush()
        if self._own and self._out is not None:
            self._out.close()
        self._out = None
        self._update_active()
