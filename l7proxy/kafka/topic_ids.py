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
