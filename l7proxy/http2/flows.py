"""Flow records of an HTTP/2 connection: one per stream the policy decided (forwarded when its
answer ends, dropped when denied), one per stream refused before the policy, one per connection
that failed to reach its upstream. Header values are never recorded (LOG names the header only).
"""

from __future__ import annotations

import time

from l7proxy.flows import DROPPED, ERROR, FORWARDED
from parsers.http2 import RequestRejected
from parsers.http2.frames import ERROR_NAMES, REFUSED_STREAM
from parsers.http2.grpc import STATUS_NAMES

_monotonic = time.monotonic


class InFlight:
    """A stream the policy allowed, until its answer ends (or a denied one, for its flow)."""

    __slots__ = ("start", "request", "status", "logged")

    def __init__(self, start: float, request, logged) -> None:
        self.start = start
        self.request = request
        self.status = 0
        self.logged = logged  # header names a LOG mismatch action named (never their values)


def emit_stream_flow(ctx, item: InFlight, verdict: str, grpc_status, ended=None) -> None:
    req = item.request
    latency = int((_monotonic() - item.start) * 1e9)
    http = {
        "code": item.status,
        "method": req.method,
        "url": req.path,
        "protocol": "HTTP/2",
        "headers": [{"key": name, "value": "[mismatch]"} for name in item.logged],
    }
    summary = f"HTTP/2 {item.status} {latency // 1_000_000}ms ({req.method} {req.path})"
    if req.is_grpc:
        grpc = {"method": req.path}
        if grpc_status is not None:
            code = int(grpc_status) if grpc_status.isdigit() else -1
            grpc["status_code"] = code
            grpc["status"] = STATUS_NAMES.get(code, str(grpc_status))
            summary += f" grpc-status {grpc['status']}"
        http["grpc"] = grpc
    if ended is not None and ended.reset_code is not None:
        http["reset"] = ERROR_NAMES.get(ended.reset_code, str(ended.reset_code))
        http["reset_by"] = ended.reset_by
        summary += f" reset by {ended.reset_by}"
    l7 = {
        "type": "RESPONSE" if verdict == FORWARDED else "REQUEST",
        "latency_ns": latency,
        "http": http,
    }
    drop = "POLICY_DENIED" if verdict == DROPPED else None
    ctx.flows.emit(ctx.flow(verdict, l7, summary, drop_reason=drop))


def emit_rejected(ctx, ev: RequestRejected) -> None:
    """A stream the proxy refused before the policy (malformed, too large, over the limit)."""
    refused = ev.error_code == REFUSED_STREAM
    reason = "REFUSED_STREAM" if refused else "PARSE_ERROR"
    http = {"code": ev.status, "protocol": "HTTP/2", "headers": []}
    l7 = {"type": "REQUEST", "latency_ns": 0, "http": http}
    summary = f"HTTP/2 {ev.status or ERROR_NAMES.get(ev.error_code, ev.error_code)} {ev.reason}"
    ctx.flows.emit(ctx.flow(ERROR if refused else DROPPED, l7, summary, drop_reason=reason))


def emit_connection_error(ctx, reason: str) -> None:
    if ctx.flows.active:
        l7 = {"type": "RESPONSE", "latency_ns": 0, "http": {"protocol": "HTTP/2"}}
        ctx.flows.emit(ctx.flow(ERROR, l7, f"HTTP/2 {reason}", drop_reason=reason))
