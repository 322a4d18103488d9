"""Flows and metrics of a Kafka connection, from the layer's `Record` commands."""

from __future__ import annotations

from l7proxy.flows import DROPPED, ERROR, FORWARDED
from l7proxy.kafka.commands import Record
from l7proxy.kafka.worker import KafkaMetrics
from parsers.kafka.apis import api_name

_VERDICTS = {"FORWARDED": FORWARDED, "DROPPED": DROPPED, "ERROR": ERROR}


class FlowRecorder:
    """One connection's flows (one per topic of a request, one per response, one per close)
    and metrics (policy_l7_total once per request, latency and error codes per response)."""

    __slots__ = ("ctx", "metrics", "_last_counted")

    def __init__(self, ctx, metrics: KafkaMetrics) -> None:
        self.ctx = ctx
        self.metrics = metrics
        self._last_counted = None

    def record(self, rec: Record) -> None:
        pm = self.ctx.proto_metrics
        if rec.kind == "RESPONSE":
            seconds = rec.latency_ns / 1e9
            pm.duration.observe(seconds)
            self.metrics.observe(rec.api_key, seconds)
            if rec.error_code:
                self.metrics.response_errors.labels(
                    api_key=api_name(rec.api_key), error_code=str(rec.error_code)
                ).inc()
        elif self._last_counted != rec.correlation_id or rec.verdict == "ERROR":
            # One count per request, though a request yields one record per topic.
            self._last_counted = rec.correlation_id
            pm.received.inc()
            if rec.verdict == "FORWARDED":
                pm.forwarded.inc()
            elif rec.verdict == "DROPPED":
                pm.denied.inc()
            else:
                pm.parse_errors.inc()
                if rec.closes:
                    self.metrics.frame_errors.labels(reason=rec.reason or "error").inc()
        if not self.ctx.flows.active:
            return
        name = api_name(rec.api_key) if rec.api_key >= 0 else "unknown"
        kafka = {
            "api_key": name,
            "api_version": rec.api_version,
            "correlation_id": rec.correlation_id,
            "topic": rec.topic or "",
            "error_code": rec.error_code,
        }
        l7 = {"type": rec.kind, "latency_ns": rec.latency_ns, "kafka": kafka}
        summary = f"Kafka {rec.kind.lower()} {name} v{rec.api_version}"
        if rec.topic:
            summary += f" topic {rec.topic}"
        if rec.reason and rec.verdict == "ERROR":
            summary += f" ({rec.reason})"
        drop = rec.reason if rec.verdict != "FORWARDED" else None
        self.ctx.flows.emit(self.ctx.flow(_VERDICTS[rec.verdict], l7, summary, drop_reason=drop))
