"""What the Kafka layer hands to the session (commands and flow records), its settings, and the
bookkeeping of one request in flight."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ToUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class ToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    reason: str  # machine-friendly, e.g. "frame_too_large"
    detail: str


@dataclass(frozen=True, slots=True)
class ResolveTopicIds:
    """A request names topic ids that no Metadata response seen by this process named (its
    Metadata went through another worker, or before a restart). The session asks the broker
    itself (one Metadata request on a connection of its own), hands what it learns to the layer's
    `learn_topic_ids()`, then calls `KafkaLayer.topic_ids_resolved()`. Until then the request waits,
    and every request behind it: answers stay in order."""

    ids: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Record:
    """One flow and its metrics: a request (per topic) or the end of a response."""

    kind: str  # "REQUEST" or "RESPONSE"
    verdict: str  # FORWARDED, DROPPED, ERROR
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None = None
    topic: str | None = None
    error_code: int = 0
    latency_ns: int = 0
    reason: str | None = None
    closes: bool = False  # the proxy closes the connection after this record


@dataclass(slots=True)
class Pending:
    """A request whose answer is still owed to the client, in answer order."""

    correlation_id: int
    api_key: int
    api_version: int
    flexible: bool
    started_ns: int
    synthetic: bytes | None = None  # a denial waiting its turn
    denied_topics: tuple = ()  # Metadata: (name, id) answered with 29 in the response
    only_denied: bool = False  # Metadata v0 asked for all topics: show only the denied ones
    error_code: int = 0  # first non-zero error code seen in the response
    filter_topics: bool = False  # an "all topics" answer to filter by visibility
    learn_session: bool = False  # a Fetch opening a fetch session: read the id it gets


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """What the layer of one connection needs from the config (settings.settings_for)."""

    max_frame_size: int = 8 * 1024 * 1024
    max_request_elements: int = 100_000  # ProxyConfig.kafka.max_request_elements
    # Gateway mode: broker address seen in responses -> gateway listener to advertise instead.
    brokers: Mapping[Address, Address] | None = None
