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
    error_code: int = 0  # first non-zero error code seen in the response
    filter_topics: bool = False  # an "all topics" answer to filter by visibility
    learn_session: bool = False  # a Fetch opening a fetch session: read the id it gets


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    max_frame_size: int = 8 * 1024 * 1024
    # Kafka frames run to megabytes; with the HTTP-sized 256 KiB mark every produce request would
    # pause the client and throttle a pipelining producer. Buffers stay bounded by these marks.
    write_high_water: int = 4 * 1024 * 1024
    write_low_water: int = 1024 * 1024
    # SO_RCVBUF of the client socket and SO_SNDBUF of the broker socket (0: kernel autotuning,
    # which grows loopback buffers to megabytes). Bytes parked in the proxy path are requests
    # the broker reads cache-cold later; 512 KiB measured best for produce (docs/kafka.md).
    socket_buffer: int = 512 * 1024
    # Gateway mode: broker address seen in responses -> gateway listener to advertise instead.
    brokers: Mapping[Address, Address] | None = None
