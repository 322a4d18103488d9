"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), pure: no I/O.

Each backend gets a permutation of the M table slots from two hashes of its name (offset and
skip); backends take turns claiming their next preferred free slot until the table is full. The
same backend names give the same table on every node, and removing one of N backends moves
about 1/N of the slots (those it owned, plus a few). M = 16381 is Cilium's default table size, a
prime, so every skip in 1..M-1 walks all slots.

The hashes come from BLAKE2b keyed by a cluster-wide seed (Cilium: `maglev.hashSeed`), not from
Python's `hash()`, which changes from process to process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

DEFAULT_M = 16381
PRIMES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)  # Cilium's allowed sizes
DEFAULT_SEED = b"JLfvgnHc2kaSUFaI"  # Cilium's DefaultHashSeed, as bytes


def _hashes(name: str, seed: bytes) -> tuple[int, int]:
    digest = hashlib.blake2b(name.encode(), digest_size=16, key=seed).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:], "little")


def permutation_params(name: str, m: int = DEFAULT_M, seed: bytes = DEFAULT_SEED):
    h1, h2 = _hashes(name, seed)
    return h1 % m, h2 % (m - 1) + 1  # offset, skip


def table(names: Sequence[str], m: int = DEFAULT_M, seed: bytes = DEFAULT_SEED) -> list[int]:
    """The lookup table: slot -> index into `sorted(names)`. Empty names give an empty table.

    Names are sorted first, so the caller's order does not matter (as Cilium sorts backends)."""
    if m not in PRIMES:
        raise ValueError(f"Maglev table size {m} is not one of {PRIMES}")
    ordered = sorted(set(names))
    n = len(ordered)
    if n == 0:
        return []
    if n > m:
        raise ValueError(f"{n} backends do not fit a Maglev table of {m}")
    params = [permutation_params(name, m, seed) for name in ordered]
    nxt = [0] * n
    entry = [-1] * m
    filled = 0
    while True:
        for i in range(n):
            offset, skip = params[i]
            j = nxt[i]
            c = (offset + j * skip) % m
            while entry[c] >= 0:
                j += 1
                c = (offset + j * skip) % m
            entry[c] = i
            nxt[i] = j + 1
            filled += 1
            if filled == m:
                return entry


def pick(entries: Sequence[int], flow_hash: int) -> int:
    """The backend index for a flow hash (-1 when there is no backend)."""
    if not entries:
        return -1
    return entries[flow_hash % len(entries)]


def moved_fraction(before: Sequence[str], after: Sequence[str], flow_hashes, m=DEFAULT_M) -> float:
    """The share of flow hashes whose backend (by name) changes between two backend sets."""
    a, b = sorted(set(before)), sorted(set(after))
    ta, tb = table(a, m), table(b, m)
    hashes = list(flow_hashes)
    moved = sum(1 for h in hashes if a[pick(ta, h)] != b[pick(tb, h)])
    return moved / len(hashes) if hashes else 0.0
