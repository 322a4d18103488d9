"""Topic id -> name, learned from the Metadata answers a worker relays.

Fetch v13+ (and other requests) name topics by id; the policy decides by name. Ids are
cluster-wide UUIDs and a client often fetches on another connection than the one it asked
Metadata on, so one map serves every connection of a worker (`KafkaWorker.topic_ids`); ids of
topics hidden from a client are learned too, so a request by id resolves and is decided by name.
"""

from __future__ import annotations

# Bound of one map; Metadata answers refill it after a clear.
MAX_TOPIC_IDS = 200_000


class TopicIdMap(dict):
    """A dict of id (16 bytes) -> topic name, bounded by `learn`."""

    __slots__ = ()

    def learn(self, ids: dict[bytes, str]) -> None:
        """Add id -> name pairs (from a Metadata answer or the proxy's own lookup)."""
        if len(self) > MAX_TOPIC_IDS:
            self.clear()
        self.update(ids)


# An unknown topic id is looked up with the broker at most once per this long per connection;
# in between, requests naming it are denied (fail closed) without asking again.
RESOLVE_RETRY_NS = 1_000_000_000


class LookupThrottle:
    """One connection's recent lookups of unknown topic ids, so that a client sending bogus ids
    cannot turn every request into a broker round trip (bounded)."""

    __slots__ = ("_tried",)

    def __init__(self) -> None:
        self._tried: dict[bytes, int] = {}  # topic id -> clock (ns) of the last lookup

    def may_ask(self, ids: list, now: int) -> bool:
        """Whether to ask the broker about `ids` now (not if each was asked about lately)."""
        tried = self._tried
        if all(i in tried and now - tried[i] < RESOLVE_RETRY_NS for i in ids):
            return False
        if len(tried) > 4096:
            tried.clear()
        for i in ids:
            tried[i] = now
        return True
