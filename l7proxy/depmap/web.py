"""The map on the admin port: `/map` (the page), `/map.json`, `/map.dot`, `/map/events` (SSE).

`mount(admin, flow_sink)` is the one call a start-up path (gateway, agent) makes: it subscribes
to the flow sink, feeds every flow into a `DepMap`, and adds the routes. Live clients get the
nodes and edges changed since the version they have, at most one message per `interval` (bursts
coalesce), with a comment line every `heartbeat` seconds so a gone client is noticed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from l7proxy.admin import AdminRequest, AdminResponse
from l7proxy.depmap.dot import to_dot
from l7proxy.depmap.follow import follow
from l7proxy.depmap.graph import DepMap

STATIC = Path(__file__).resolve().parent / "static"
# Every asset the page loads, all served from the package (the page must work offline).
ASSETS = {
    "map.js": "text/javascript; charset=utf-8",
    "map.css": "text/css; charset=utf-8",
    "vendor/cytoscape.min.js": "text/javascript; charset=utf-8",
    "vendor/LICENSE": "text/plain; charset=utf-8",
}
PAGE_HEADERS = {
    # Nothing but our own origin; cytoscape sets inline styles on its container.
    "content-security-policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:",
    "x-content-type-options": "nosniff",
}
DEFAULT_INTERVAL = 0.25
DEFAULT_HEARTBEAT = 15.0
MAX_STREAMS = 32


def sse_message(event: str, data: dict, event_id: str | None = None) -> bytes:
    lines = [f"event: {event}"]
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return ("\n".join(lines) + "\n\n").encode()


def parse_since(raw: str, epoch: str) -> int:
    """`EPOCH-VERSION` -> VERSION when the epoch is this map's, else 0 (send everything)."""
    their_epoch, _, version = raw.rpartition("-")
    if their_epoch != epoch:
        return 0
    try:
        return max(0, int(version))
    except ValueError:
        return 0


class MapService:
    def __init__(
        self,
        depmap: DepMap | None = None,
        *,
        interval: float = DEFAULT_INTERVAL,
        heartbeat: float = DEFAULT_HEARTBEAT,
        max_streams: int = MAX_STREAMS,
    ) -> None:
        self.map = depmap if depmap is not None else DepMap()
        # Versions restart with the process; the epoch tells a client its versions are stale.
        self.epoch = secrets.token_hex(4)
        self.interval = interval
        self.heartbeat = heartbeat
        self.max_streams = max_streams
        self.streams = 0
        self._changed = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sink = None
        self._queue: asyncio.Queue | None = None
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- feeding ----
    def feed(self, flow: dict) -> None:
        if self.map.add(flow):
            self._wake()

    def _wake(self) -> None:
        # Every waiting stream holds the current event; replace it so the next wait is fresh.
        # With no stream open nobody holds it (a stream compares versions before it waits):
        # nothing to do, and no new Event per loop turn while the node proxy is busy.
        if not self.streams:
            return
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def consume(self, queue: asyncio.Queue) -> None:
        while True:
            self.feed(await queue.get())
            while not queue.empty():  # take a burst in one go, wake the streams once
                self.map.add(queue.get_nowait())
            self._wake()

    def attach(self, flow_sink) -> None:
        """Feed the map from a flow sink. The agent's FlowLog calls observers in line with each
        flow: the map then adds it at once (a bounded, O(1) step) and wakes its streams once
        per event loop turn, where a queue would wake a consumer task per flow (about 10 us
        per request of the node proxy, docs/bench.md). Other sinks are consumed from a queue
        on the running loop."""
        self._sink = flow_sink
        if hasattr(flow_sink, "add_observer"):
            self._loop = asyncio.get_running_loop()
            flow_sink.add_observer(self.observe, pending=self.observe_pending)
            return
        self._queue = flow_sink.subscribe()
        self._task = asyncio.get_running_loop().create_task(self.consume(self._queue))

    def observe(self, flow: dict) -> None:
        """One flow, in line (FlowLog observer): added now, streams woken at the end of the turn."""
        if self.map.add(flow):
            self._wake_soon()

    def observe_pending(self, pending) -> None:
        """One node proxy flow not built yet (FlowLog observer): added from its fields."""
        if self.map.add_pending(pending):
            self._wake_soon()

    def _wake_soon(self) -> None:
        """Open streams are woken once at the end of this loop turn (none open: nothing to do)."""
        if self.streams and not self._wake_pending:
            self._wake_pending = True
            self._loop.call_soon(self._wake_once)

    def _wake_once(self) -> None:
        self._wake_pending = False
        self._wake()

    def attach_log(self, path: str) -> None:
        """Follow a flow log that other processes append to (several gateway workers)."""
        self._task = asyncio.get_running_loop().create_task(
            follow(path, self.feed, from_start=False)
        )

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._sink is not None and self._queue is not None:
            self._sink.unsubscribe(self._queue)
        elif self._sink is not None:
            self._sink.remove_observer(self.observe)
        self._sink = self._queue = None

    # ---- HTTP handlers ----
    async def page(self, request: AdminRequest) -> AdminResponse:
        body = (STATIC / "index.html").read_bytes()
        return AdminResponse(200, body, "text/html; charset=utf-8", dict(PAGE_HEADERS))

    async def map_json(self, request: AdminRequest) -> AdminResponse:
        return AdminResponse.json({"epoch": self.epoch, **self.map.to_dict()})

    async def map_dot(self, request: AdminRequest) -> AdminResponse:
        return AdminResponse(200, to_dot(self.map.to_dict()).encode(), "text/vnd.graphviz")

    def asset_handler(self, name: str):
        content_type = ASSETS[name]

        async def asset(request: AdminRequest) -> AdminResponse:
            try:
                body = (STATIC / name).read_bytes()
            except OSError:
                return AdminResponse.text(f"{name} is not installed (run make setup)\n", 404)
            return AdminResponse(200, body, content_type, {"cache-control": "max-age=300"})

        return asset

    async def events(self, request: AdminRequest) -> AdminResponse:
        if self.streams >= self.max_streams:
            return AdminResponse.text("too many map streams\n", 503)
        return AdminResponse(
            200,
            content_type="text/event-stream",
            headers={"x-accel-buffering": "no"},
            stream=self.stream(self._since(request)),
        )

    def _since(self, request: AdminRequest) -> int:
        """The version a client has: `?since=`, or Last-Event-ID when EventSource reconnects."""
        raw = request.headers.get("last-event-id") or (request.query.get("since") or [""])[0]
        return parse_since(raw, self.epoch)

    async def stream(self, since: int) -> AsyncIterator[bytes]:
        self.streams += 1
        try:
            yield b"retry: 2000\n\n"
            if since > self.map.version:
                since = 0
            while True:
                if self.map.version > since:
                    delta = {"epoch": self.epoch, **self.map.changes_since(since)}
                    since = delta["version"]
                    yield sse_message("changes", delta, f"{self.epoch}-{since}")
                    await asyncio.sleep(self.interval)
                    continue
                changed = self._changed
                try:
                    await asyncio.wait_for(changed.wait(), self.heartbeat)
                except TimeoutError:
                    yield b": keep-alive\n\n"
        finally:
            self.streams -= 1


def mount(
    admin, flow_sink=None, depmap: DepMap | None = None, follow_log: str | None = None, **kw
) -> MapService:
    """Add the map routes to an AdminServer and feed the map (on the running loop).

    The feed is `flow_sink` (a FlowSink or anything with subscribe/unsubscribe), or, when the
    flows come from several processes (`--workers N` with one admin), `follow_log`: the shared
    flow log file, read from its current end. Call it from gateway/agent start-up inside the
    event loop; `await service.close()` on stop.
    """
    if flow_sink is not None and follow_log is not None:
        raise ValueError("feed the map from a flow sink or a flow log, not both")
    service = MapService(depmap, **kw)
    admin.add_route("/map", service.page)
    admin.add_route("/map/", service.page)
    admin.add_route("/map.json", service.map_json)
    admin.add_route("/map.dot", service.map_dot)
    admin.add_route("/map/events", service.events)
    for name in ASSETS:
        admin.add_route(f"/map/static/{name}", service.asset_handler(name))
    if flow_sink is not None:
        service.attach(flow_sink)
    elif follow_log is not None:
        service.attach_log(follow_log)
    return service
