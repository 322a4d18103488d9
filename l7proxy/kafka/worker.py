"""What the Kafka sessions of one worker share: the topic id map, the topic id lookups in flight,
and the Kafka metrics on the worker's registry.

The worker's `DeadlineSweeper` (l7proxy/server.py, one per gateway or agent worker, holding every
session of that worker) carries it in `shared["kafka"]`; a session without a sweeper (tests, a
harness) gets one of its own unless one is handed to it.
"""

from __future__ import annotations

from l7proxy.kafka.resolve import SharedLookups
from l7proxy.kafka.topic_ids import TopicIdMap
from parsers.kafka.apis import api_name


class KafkaMetrics:
    """Kafka-only metrics next to the shared policy_l7_total{proto="kafka"}."""

    __slots__ = ("latency", "frame_errors", "response_errors", "topic_id_lookups", "_by_key")

    def __init__(self, registry) -> None:
        self.latency = registry.histogram(
            "l7proxy_kafka_request_duration_seconds",
            "Kafka request latency through the proxy, by API key",
            ("api_key",),
        )
        self.frame_errors = registry.counter(
            "l7proxy_kafka_connection_errors_total",
            "Kafka connections closed by the proxy, by reason (frame_too_large, ...)",
            ("reason",),
        )
        self.response_errors = registry.counter(
            "l7proxy_kafka_response_errors_total",
            "Non-zero error codes in broker responses (first per response), by API key and code",
            ("api_key", "error_code"),
        )
        self.topic_id_lookups = registry.counter(
            "l7proxy_kafka_topic_id_lookups_total",
            "Topic ids looked up with the broker because no Metadata seen here named them, by "
            "result (found, not_found, error)",
            ("result",),
        )
        self._by_key: dict[int, object] = {}

    def observe(self, api_key: int, seconds: float) -> None:
        child = self._by_key.get(api_key)
        if child is None:
            child = self._by_key[api_key] = self.latency.labels(api_key=api_name(api_key))
        child.observe(seconds)


class KafkaWorker:
    """The Kafka state one worker's sessions share (see the module docstring)."""

    __slots__ = ("topic_ids", "lookups", "metrics")

    def __init__(self, registry) -> None:
        self.topic_ids = TopicIdMap()
        self.lookups = SharedLookups()
        self.metrics = KafkaMetrics(registry)


def worker_for(ctx) -> KafkaWorker:
    """The worker's KafkaWorker, kept by its sweeper; a new one when there is no sweeper."""
    registry = ctx.metrics.registry
    shared = getattr(ctx.sweeper, "shared", None)
    if shared is None:
        return KafkaWorker(registry)
    worker = shared.get("kafka")
    if worker is None:
        worker = shared["kafka"] = KafkaWorker(registry)
    return worker
