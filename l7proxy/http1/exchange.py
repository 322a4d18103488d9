"""One request/response exchange of an HTTP/1 session, and the flow record it leaves."""

from __future__ import annotations

import time

from l7proxy.flows import DROPPED, ERROR, HttpFlow
from parsers.http1 import ParseError, Request

_monotonic = time.monotonic


class Exchange:
    """One request and the state of its answer."""

    __slots__ = (
        "req",
        "allowed",
        "raw",
        "complete",
        "keep_alive",
        "sent",
        "answered",
        "pending",
        "status",
        "start",
        "error",
        "logged",
        "body_left",
    )

    def __init__(self, req: Request | None, allowed: bool, raw: bytes | None, start: float):
        self.req = req
        self.allowed = allowed
        self.raw = raw
        self.complete = False
        self.keep_alive = True
        self.sent = False  # head written upstream; body goes straight through
        self.answered = False  # the proxy wrote its own response (deny, error)
        self.pending: list[bytes] | None = None  # body bytes waiting for the head to go
        self.status = 0
        self.start = start
        self.error: ParseError | None = None
        self.logged: tuple[str, ...] = ()
        # Content-Length body bytes not read yet, for an allowed request that may be spliced
        # (l7proxy/http1/bodies.py); 0 otherwise.
        self.body_left = 0


def emit_flow(ctx, ex: Exchange, verdict: str, now: float) -> None:
    """The exchange's flow, built when read (l7proxy/flows.py, `HttpFlow`)."""
    flows = ctx.flows
    if not flows.active:
        return
    first = not ctx.has_peers
    source, destination = ctx.peers()
    req = ex.req
    flows.emit_pending(
        HttpFlow(
            source, destination, ctx.client_port, ctx.listener_port, ctx.direction, verdict,
            req.method, req.target, req.version, ex.status, int((now - ex.start) * 1e9),
            ex.logged, time.time_ns(), first,
        )
    )  # fmt: skip


def emit_error_flow(ctx, ex: Exchange, status: int, reason: str) -> None:
    flows = ctx.flows
    if not flows.active:
        return
    req = ex.req
    http = {"code": status, "protocol": "HTTP/1.1", "headers": []}
    if req is not None:
        http["method"] = req.method.decode("latin-1")
        http["url"] = req.target.decode("latin-1")
    latency = int((_monotonic() - ex.start) * 1e9)
    l7 = {"type": "RESPONSE", "latency_ns": latency, "http": http}
    verdict = DROPPED if reason == "PARSE_ERROR" else ERROR
    summary = f"HTTP/1.1 {status} {reason}"
    flows.emit(ctx.flow(verdict, l7, summary, drop_reason=reason))
