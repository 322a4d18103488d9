"""The compiled per-endpoint decision table, shaped like Cilium's policy map.

Key: (peer identity or 0 = any, direction, protocol or 0 = any, port, port prefix length 0..16).
Entry: deny, or allow, or redirect to the proxy with an L7 rule-set id.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple


class PolicyKey(NamedTuple):
    identity: int  # 0 = any peer
    direction: int  # INGRESS / EGRESS
    proto: int  # 0 = any
    port: int  # network-order agnostic: the first port of the prefix
    prefix_len: int  # 16 = exact port, 0 = all ports

    def covers_port(self, port: int) -> bool:
        shift = 16 - self.prefix_len
        return (port >> shift) == (self.port >> shift)

    def port_text(self) -> str:
        if self.prefix_len == 0:
            return "*"
        if self.prefix_len == 16:
            return str(self.port)
        last = self.port | ((1 << (16 - self.prefix_len)) - 1)
        return f"{self.port}-{last}"


class PolicyEntry(NamedTuple):
    deny: bool
    l7_id: int  # 0 = plain allow (or deny); else redirect to the proxy with this rule set
    derived_from: tuple[str, ...]

    @property
    def action(self) -> str:
        if self.deny:
            return "deny"
        return "redirect" if self.l7_id else "allow"


def port_prefixes(first: int, last: int) -> list[tuple[int, int]]:
    """Cover [first, last] with the fewest (port, prefix_len) blocks. (0, 65535) -> [(0, 0)]."""
    out = []
    port = first
    while port <= last:
        size = 16
        # grow the block while it stays aligned and inside the range
        while size > 0:
            bigger = 16 - size + 1
            span = 1 << bigger
            if port % span != 0 or port + span - 1 > last:
                break
            size -= 1
        out.append((port, size))
        port += 1 << (16 - size)
    return out


@dataclass(frozen=True, slots=True)
class MapChanges:
    adds: dict[PolicyKey, PolicyEntry] = field(default_factory=dict)
    deletes: tuple[PolicyKey, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.adds or self.deletes)


class MapState:
    """Mapping PolicyKey -> PolicyEntry with Cilium's lookup precedence.

    `lookup` answers deny first (any matching deny entry wins), then prefers an L3-specific entry
    over an L3-wildcard one, then the longest port prefix, then a specific protocol over any.
    Compilation also writes deny entries on every more specific key an allow would otherwise win
    with, so a plain most-specific-key lookup (as the BPF side does) gives the same answer.
    """

    __slots__ = ("_entries", "_by_dir")

    def __init__(self, entries: dict[PolicyKey, PolicyEntry] | None = None):
        self._entries: dict[PolicyKey, PolicyEntry] = dict(entries or {})
        self._by_dir: dict[tuple[int, int], list[PolicyKey]] | None = None

    # mapping protocol
    def __getitem__(self, key: PolicyKey) -> PolicyEntry:
        return self._entries[key]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[PolicyKey]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MapState) and self._entries == other._entries

    def get(self, key, default=None):
        return self._entries.get(key, default)

    def items(self):
        return self._entries.items()

    def keys(self):
        return self._entries.keys()

    def values(self):
        return self._entries.values()

    def sorted_items(self) -> list[tuple[PolicyKey, PolicyEntry]]:
        return sorted(self._entries.items())

    def _index(self) -> dict[tuple[int, int], list[PolicyKey]]:
        if self._by_dir is None:
            index: dict[tuple[int, int], list[PolicyKey]] = {}
            for key in self._entries:
                index.setdefault((key.identity, key.direction), []).append(key)
            self._by_dir = index
        return self._by_dir

    def matches(self, identity: int, direction: int, proto: int, port: int) -> list[PolicyKey]:
        index = self._index()
        out = []
        for ident in (identity, 0) if identity else (0,):
            for key in index.get((ident, direction), ()):
                if key.proto in (0, proto) and key.covers_port(port):
                    out.append(key)
        return out

    def lookup(self, identity: int, direction: int, proto: int, port: int) -> PolicyEntry | None:
        key = self.lookup_key(identity, direction, proto, port)
        return None if key is None else self._entries[key]

    def lookup_key(self, identity: int, direction: int, proto: int, port: int) -> PolicyKey | None:
        """The key that decides: any matching deny first, then L3-specific over L3-wildcard, then
        the longest port prefix, then a specific protocol over any."""
        keys = self.matches(identity, direction, proto, port)
        if not keys:
            return None
        denies = [k for k in keys if self._entries[k].deny]
        return max(denies or keys, key=lambda k: (k.identity != 0, k.prefix_len, k.proto != 0))


def diff_maps(old: MapState | None, new: MapState) -> MapChanges:
    old_entries = dict(old.items()) if old is not None else {}
    adds = {k: v for k, v in new.items() if old_entries.get(k) != v}
    deletes = tuple(sorted(k for k in old_entries if k not in new))
    return MapChanges(adds, deletes)


# -- key geometry: which keys cover or overlap which (used by the compiler's closures) ---------


def group_by_peer(keys: Iterable[PolicyKey]) -> dict[tuple[int, int], list[PolicyKey]]:
    out: dict[tuple[int, int], list[PolicyKey]] = {}
    for k in keys:
        out.setdefault((k.identity, k.direction), []).append(k)
    return out


def group_by_direction(keys: Iterable[PolicyKey]) -> dict[int, list[PolicyKey]]:
    out: dict[int, list[PolicyKey]] = {}
    for k in keys:
        out.setdefault(k.direction, []).append(k)
    return out


def overlap_candidates(key: PolicyKey, by_peer, by_dir) -> list[PolicyKey]:
    """Keys that can overlap `key`: same peer or any-peer keys; every key for an any-peer key."""
    if key.identity == 0:
        return by_dir.get(key.direction, [])
    return by_peer.get((key.identity, key.direction), []) + by_peer.get((0, key.direction), [])


def covers(b: PolicyKey, k: PolicyKey) -> bool:
    """b's key space contains k's."""
    if b.direction != k.direction:
        return False
    if b.identity not in (0, k.identity):
        return False
    if b.proto not in (0, k.proto):
        return False
    if b.prefix_len > k.prefix_len:
        return False
    shift = 16 - b.prefix_len
    return (k.port >> shift) == (b.port >> shift)


def intersect(a: PolicyKey, b: PolicyKey) -> PolicyKey | None:
    if a.direction != b.direction:
        return None
    if a.identity and b.identity and a.identity != b.identity:
        return None
    if a.proto and b.proto and a.proto != b.proto:
        return None
    narrow, wide = (a, b) if a.prefix_len >= b.prefix_len else (b, a)
    shift = 16 - wide.prefix_len
    if (narrow.port >> shift) != (wide.port >> shift):
        return None
    return PolicyKey(
        a.identity or b.identity, a.direction, a.proto or b.proto, narrow.port, narrow.prefix_len
    )
