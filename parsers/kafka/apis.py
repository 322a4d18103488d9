"""The one table of Kafka APIs the proxy understands: key -> name, kind, versions, schemas, topics.

`API_TABLE[key]` is an `ApiSpec`. A request whose key is missing, or whose version is outside
`versions`, cannot be parsed; the ApiVersions cap keeps clients from choosing such versions.
Topic references are found by walking `topic_paths` through the decoded request: a leaf that is
a str is a topic name, a 16-byte value is a topic id (resolved through Metadata responses).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from parsers.kafka.codec import ZERO_UUID, StructCodec, compile_struct
from parsers.kafka.keys import (
    CLUSTER_AUTHORIZATION_FAILED,
    DESCRIBE_TOPIC_PARTITIONS,
    FETCH,
    GROUP_AUTHORIZATION_FAILED,
    LIST_OFFSETS,
    METADATA,
    OFFSET_FETCH,
    PRODUCE,
    RESOURCE_TOPIC,
    TOPIC_AUTHORIZATION_FAILED,
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
)
from parsers.kafka.schemas import MESSAGES
from parsers.kafka.schemas_extra import EXTRA_MESSAGES


class Kind(Enum):
    """Which authorization error a denial answers with (when no topic was the reason)."""

    TOPIC = TOPIC_AUTHORIZATION_FAILED
    GROUP = GROUP_AUTHORIZATION_FAILED
    CLUSTER = CLUSTER_AUTHORIZATION_FAILED
    TRANSACTIONAL = TRANSACTIONAL_ID_AUTHORIZATION_FAILED


# Flow names follow Cilium's Kafka API key names where Cilium has one.
_FLOW_NAMES = {PRODUCE: "produce", FETCH: "fetch", LIST_OFFSETS: "offsets", METADATA: "metadata"}

_KINDS = {
    Kind.TOPIC: (0, 1, 2, 3, 19, 20, 21, 23, 32, 33, 37, 44, 61, 75),
    Kind.GROUP: (8, 9, 10, 11, 12, 13, 14, 15, 16, 42, 47, 68),
    Kind.TRANSACTIONAL: (22, 24, 25, 26, 28, 65, 66),
}

# (path...) through the decoded request to topic names / ids.
TOPIC_PATHS: dict[int, tuple[tuple[str, ...], ...]] = {
    0: (("topic_data", "name"), ("topic_data", "topic_id")),
    1: (("topics", "topic"), ("topics", "topic_id")),
    2: (("topics", "name"),),
    3: (("topics", "name"), ("topics", "topic_id")),
    8: (("topics", "name"), ("topics", "topic_id")),
    9: (("topics", "name"), ("groups", "topics", "name"), ("groups", "topics", "topic_id")),
    19: (("topics", "name"),),
    20: (("topic_names",), ("topics", "name"), ("topics", "topic_id")),
    21: (("topics", "name"),),
    23: (("topics", "topic"),),
    24: (("v3_and_below_topics", "name"), ("transactions", "topics", "name")),
    27: (("markers", "topics", "name"),),
    28: (("topics", "name"),),
    34: (("dirs", "topics", "name"),),
    35: (("topics", "topic"),),
    37: (("topics", "name"),),
    43: (("topic_partitions", "topic"),),
    45: (("topics", "name"),),
    46: (("topics", "name"),),
    47: (("topics", "name"),),
    55: (("topics", "topic_name"),),
    61: (("topics", "name"),),
    68: (("subscribed_topic_names",), ("topic_partitions", "topic_id")),
    75: (("topics", "name"),),
}
# Config APIs name topics as resources of type TOPIC.
RESOURCE_APIS = (32, 33, 44)


@dataclass(frozen=True, slots=True)
class ApiSpec:
    key: int
    name: str  # flow name, e.g. "produce"
    spec_name: str  # Kafka's name, e.g. "Produce"
    kind: Kind
    versions: tuple[int, int]
    flexible_min: int | None
    request_fields: tuple
    response_fields: tuple

    def flexible(self, version: int) -> bool:
        return self.flexible_min is not None and version >= self.flexible_min

    def request_codec(self, version: int) -> StructCodec:
        return compile_struct(self.request_fields, version, self.flexible(version))

    def response_codec(self, version: int) -> StructCodec:
        return compile_struct(self.response_fields, version, self.flexible(version))


def _kind_of(key: int) -> Kind:
    for kind, keys in _KINDS.items():
        if key in keys:
            return kind
    return Kind.CLUSTER


def _build() -> dict[int, ApiSpec]:
    table = {}
    for key, msg in {**MESSAGES, **EXTRA_MESSAGES}.items():
        flex = msg["flexible"]
        # Brokers still advertise (and old clients use) versions below the 4.x baseline; the
        # spec keeps the fields of those versions, so the codec reads them from 0.
        table[key] = ApiSpec(
            key=key,
            name=_FLOW_NAMES.get(key, msg["name"].lower()),
            spec_name=msg["name"],
            kind=_kind_of(key),
            versions=(0, msg["valid"][1]),
            flexible_min=flex[0] if flex else None,
            request_fields=msg["request"],
            response_fields=msg["response"],
        )
    return table


API_TABLE: dict[int, ApiSpec] = _build()


def api_name(key: int) -> str:
    spec = API_TABLE.get(key)
    return spec.name if spec else f"api{key}"


def flexible_min(key: int) -> int | None:
    spec = API_TABLE.get(key)
    return spec.flexible_min if spec else None


@dataclass(frozen=True, slots=True)
class TopicRefs:
    names: tuple[str, ...]
    ids: tuple[bytes, ...]
    all_topics: bool  # e.g. Metadata with a null topic list


def _walk(value, path: tuple[str, ...]) -> Iterator:
    if not path:
        if isinstance(value, list):
            yield from value
        else:
            yield value
        return
    if isinstance(value, list):
        for item in value:
            yield from _walk(item, path)
        return
    if not isinstance(value, dict) or path[0] not in value:
        return
    yield from _walk(value[path[0]], path[1:])


def topics_of(key: int, version: int, request: dict) -> TopicRefs:
    names: list[str] = []
    ids: list[bytes] = []
    if key in RESOURCE_APIS:
        for res in request.get("resources") or ():
            if res["resource_type"] == RESOURCE_TOPIC:
                names.append(res["resource_name"])
    for path in TOPIC_PATHS.get(key, ()):
        for leaf in _walk(request, path):
            if isinstance(leaf, str):
                names.append(leaf)
            elif isinstance(leaf, bytes) and leaf != ZERO_UUID:
                ids.append(leaf)
    all_topics = _asks_all_topics(key, version, request)
    return TopicRefs(tuple(dict.fromkeys(names)), tuple(dict.fromkeys(ids)), all_topics)


def _asks_all_topics(key: int, version: int, request: dict) -> bool:
    """Requests that name no topic but are answered for every topic (the response is filtered to
    the topics the client may see): Metadata with a null list (v0: empty), OffsetFetch for all of
    a group's committed topics, DescribeTopicPartitions with an empty list."""
    if key == METADATA:
        return request.get("topics") is None or (version == 0 and not request.get("topics"))
    if key == OFFSET_FETCH:
        if version <= 7:
            return version >= 2 and request.get("topics") is None
        return any(g.get("topics") is None for g in request.get("groups") or ())
    if key == DESCRIBE_TOPIC_PARTITIONS:
        return not request.get("topics")
    return False


def expects_response(key: int, request: dict) -> bool:
    """Produce with acks=0 is the one request a broker never answers."""
    return not (key == PRODUCE and request.get("acks") == 0)
