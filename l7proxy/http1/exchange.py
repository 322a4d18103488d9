"""One request/response exchange of an HTTP/1 session, and the flow record it leaves."""

from __future__ import annotations

import time

from l7proxy.flows import DROPPED, ERROR, FORWARDED, PendingFlow, build_flow, rfc3339_nano
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


class HttpFlow(PendingFlow):
    """The flow of one answered request, built when read (l7proxy/flows.py, `PendingFlow`)."""

    __slots__ = (
        "source", "destination", "sport", "dport", "direction", "req", "verdict", "status",
        "latency", "logged", "time_ns",
    )  # fmt: skip

    def __init__(self, ctx, ex: Exchange, verdict: str, now: float) -> None:
        super().__init__(not ctx.has_peers)
        self.source, self.destination = ctx.peers()
        self.sport, self.dport, self.direction = ctx.client_port, ctx.listener_port, ctx.direction
        self.req = ex.req
        self.verdict = verdict
        self.status = ex.status
        self.latency = int((now - ex.start) * 1e9)
        self.logged = ex.logged
        self.time_ns = time.time_ns()

    @property
    def l7_type(self) -> str:
        return "RESPONSE" if self.verdict == FORWARDED else "REQUEST"

    @property
    def drop_reason(self) -> str | None:
        return "POLICY_DENIED" if self.verdict == DROPPED else None

    def time_text(self) -> str:
        return rfc3339_nano(self.time_ns)

    def _build(self) -> dict:
        req, verdict, latency, status = self.req, self.verdict, self.latency, self.status
        method = req.method.decode("latin-1")
        url = req.target.decode("latin-1")
        version = req.version.decode()
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
            verdict=verdict,
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


def emit_flow(ctx, ex: Exchange, verdict: str, now: float) -> None:
    flows = ctx.flows
    if flows.active:
        flows.emit_pending(HttpFlow(ctx, ex, verdict, now))


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
