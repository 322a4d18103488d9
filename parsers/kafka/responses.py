"""Responses the proxy rewrites: ApiVersions (cap), Metadata (learn ids, filter, add denials,
broker addresses), FindCoordinator and DescribeCluster (broker addresses).

Everything else streams through untouched. Each function takes the response body (after the
response header) and returns the new body bytes, or None when nothing changed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from parsers.kafka.apis import API_TABLE
from parsers.kafka.codec import ZERO_UUID
from parsers.kafka.keys import (
    API_VERSIONS,
    DESCRIBE_CLUSTER,
    FIND_COORDINATOR,
    METADATA,
    TOPIC_AUTHORIZATION_FAILED,
)

REWRITTEN_APIS = frozenset((API_VERSIONS, METADATA, FIND_COORDINATOR, DESCRIBE_CLUSTER))

Address = tuple[str, int]
BrokerMap = Mapping[Address, Address]
_LOOPBACK_NAMES = ("127.0.0.1", "localhost")


def supported_versions(caps: Mapping[int, int] | None = None) -> dict[int, tuple[int, int]]:
    """The version range the proxy parses for each API, optionally lowered by `caps`."""
    out = {}
    for key, spec in API_TABLE.items():
        lo, hi = spec.versions
        if caps and key in caps:
            hi = min(hi, caps[key])
        out[key] = (lo, hi)
    return out


def cap_api_versions(body: bytes, version: int, supported: Mapping[int, tuple[int, int]]) -> bytes:
    """Intersect the broker's advertised ranges with what the proxy parses.

    APIs the proxy does not know are removed, so a client never sends a request that the proxy
    would have to refuse for want of a parser. An error response is always in the v0 layout.
    """
    spec = API_TABLE[API_VERSIONS]
    if len(body) >= 2 and body[0:2] != b"\x00\x00":
        version = 0
    codec = spec.response_codec(version)
    value, _ = codec.decode(memoryview(body), 0)
    kept = []
    for entry in value["api_keys"] or []:
        ours = supported.get(entry["api_key"])
        if ours is None:
            continue
        lo = max(entry["min_version"], ours[0])
        hi = min(entry["max_version"], ours[1])
        if lo > hi:
            continue
        kept.append({**entry, "min_version": lo, "max_version": hi})
    value["api_keys"] = kept
    out = bytearray()
    codec.encode(out, value)
    return bytes(out)


@dataclass(slots=True)
class MetadataResult:
    body: bytes
    topic_ids: dict[bytes, str] = field(default_factory=dict)  # learned id -> name
    hidden: tuple[str, ...] = ()  # topics filtered out of the response


def rewrite_metadata(
    body: bytes,
    version: int,
    visible: Callable[[str], bool] | None,
    denied: tuple[tuple[str | None, bytes | None], ...] = (),
    brokers: BrokerMap | None = None,
) -> MetadataResult:
    """Learn topic ids, drop topics the client may not see, answer the denied ones with 29,
    and point broker addresses at the gateway listeners."""
    codec = API_TABLE[METADATA].response_codec(version)
    value, _ = codec.decode(memoryview(body), 0)
    ids: dict[bytes, str] = {}
    kept, hidden = [], []
    for topic in value["topics"] or ():
        name = topic["name"]
        topic_id = topic.get("topic_id")
        if name is not None and topic_id and topic_id != ZERO_UUID:
            # Hidden topics too: a request by id then resolves and is denied by name (29).
            ids[topic_id] = name
        if visible is not None and name is not None and not visible(name):
            hidden.append(name)
            continue
        kept.append(topic)
    for name, topic_id in denied:
        kept.append(
            {
                "error_code": TOPIC_AUTHORIZATION_FAILED,
                "name": name,
                "topic_id": topic_id,
                "partitions": [],
                "topic_authorized_operations": -2147483648,
            }  # fmt: skip
        )
    value["topics"] = kept
    if brokers:
        for broker in value["brokers"] or ():
            _rewrite(broker, brokers)
    out = bytearray()
    codec.encode(out, value)
    return MetadataResult(bytes(out), ids, tuple(hidden))


def rewrite_brokers(api_key: int, body: bytes, version: int, brokers: BrokerMap) -> bytes | None:
    """FindCoordinator and DescribeCluster: replace broker host/port with the gateway's."""
    codec = API_TABLE[api_key].response_codec(version)
    value, _ = codec.decode(memoryview(body), 0)
    changed = False
    if api_key == FIND_COORDINATOR:
        if version <= 3:
            changed = _rewrite(value, brokers)
        for coordinator in value.get("coordinators") or ():
            changed |= _rewrite(coordinator, brokers)
    elif api_key == DESCRIBE_CLUSTER:
        for broker in value["brokers"] or ():
            changed |= _rewrite(broker, brokers)
    if not changed:
        return None
    out = bytearray()
    codec.encode(out, value)
    return bytes(out)


def _rewrite(entry: dict, brokers: BrokerMap) -> bool:
    host = entry["host"]
    target = brokers.get((host, entry["port"]))
    if target is None and host in _LOOPBACK_NAMES:
        for name in _LOOPBACK_NAMES:
            target = target or brokers.get((name, entry["port"]))
    if target is None:
        return False
    entry["host"], entry["port"] = target
    return True


def error_codes(value: dict) -> list[int]:
    """Every non-zero error code in a decoded message (depth first)."""
    found: list[int] = []
    _scan(value, found)
    return found


def _scan(value: dict, found: list[int]) -> None:
    for name, item in value.items():
        kind = type(item)
        if kind is list:
            for element in item:
                if type(element) is dict:
                    _scan(element, found)
        elif kind is dict:
            _scan(item, found)
        elif kind is int and item and name.endswith("error_code"):
            found.append(item)


def filter_topics(api_key: int, body: bytes, version: int, visible: Callable[[str], bool]) -> bytes:
    """OffsetFetch / DescribeTopicPartitions answered for "all topics": keep visible topics only."""
    codec = API_TABLE[api_key].response_codec(version)
    value, _ = codec.decode(memoryview(body), 0)
    lists = [value]
    if api_key == 9 and version >= 8:
        lists = value.get("groups") or []
    for holder in lists:
        topics = holder.get("topics")
        if topics:
            holder["topics"] = [t for t in topics if t.get("name") is None or visible(t["name"])]
    out = bytearray()
    codec.encode(out, value)
    return bytes(out)
