"""Maglev (issue 16): the same table on every node, ~1/N of flows move when one of N backends
goes, and the table is filled evenly."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from l7proxy.services import maglev

_RNG = random.Random(16)
HASHES = [_RNG.getrandbits(64) for _ in range(10_000)]  # a fixed set of flow hashes


def names(n: int) -> list[str]:
    return [f"10.200.{i // 200}.{i % 200 + 2}:8080" for i in range(n)]


def test_size_grows_with_the_backends_over_ciliums_primes():
    assert maglev.DEFAULT_M == 16381 and maglev.MAX_M == 131071
    assert all(p % d for p in maglev.PRIMES for d in range(2, int(p**0.5) + 1))
    sizes = {n: maglev.table_size(n) for n in (1, 3, 16, 17, 32, 33, 65, 66, 100, 1000, 5000)}
    assert sizes == {
        1: 16381, 3: 16381, 16: 16381, 17: 32749, 32: 32749, 33: 65521, 65: 65521,
        66: 131071, 100: 131071, 1000: 131071, 5000: 131071,
    }  # fmt: skip
    assert len(maglev.table(names(3))) == 16381
    assert len(maglev.table(names(100))) == 131071


def test_every_node_computes_the_same_table():
    # order of discovery differs per node; the table does not (names are sorted first)
    a = names(7)
    b = list(reversed(a))
    random.Random(3).shuffle(b)
    assert maglev.table(a) == maglev.table(b)


# The bound: removing one of N backends moves at most 1.2/N of 10,000 flow hashes.
# The paper's turn-taking fill missed it from ~30 backends on (1.50/N at 50, 2.36/N at 100
# with M = 16381); the rank fill with M from N meets it (docs/services.md has the table).
@pytest.mark.parametrize("n", [3, 10, 50, 100, 1000])
def test_removing_one_backend_moves_at_most_1_2_over_n(n):
    before = names(n)
    for gone in (0, n // 2, n - 1):
        after = before[:gone] + before[gone + 1 :]
        moved = maglev.moved_fraction(before, after, HASHES)
        assert moved <= 1.2 / n, (n, gone, moved * n)
        if n <= 100:  # at 1000, 10 flows per backend: too few to bound from below
            assert moved >= 0.8 / n  # the removed backend's share had to move


def test_adding_one_backend_moves_about_one_nth():
    moved = maglev.moved_fraction(names(9), names(10), HASHES)
    assert moved <= 1.2 / 10


@pytest.mark.parametrize("n", [10, 100])
def test_slots_are_spread_evenly(n):
    entries = maglev.table(names(n))
    counts = Counter(entries)
    mean = len(entries) / n
    assert max(counts.values()) <= maglev.load_cap(n, len(entries)) <= 1.06 * mean
    assert min(counts.values()) >= 0.94 * mean


def test_only_flows_of_the_removed_backend_must_move():
    before, after = names(5), names(5)[1:]
    ta, tb = maglev.table(before), maglev.table(after)
    kept = [h for h in HASHES if before[maglev.pick(ta, h)] != before[0]]
    moved = sum(1 for h in kept if before[maglev.pick(ta, h)] != after[maglev.pick(tb, h)])
    assert moved / len(kept) < 0.05  # the paper: a few extra slots shift, not a reshuffle


def test_edges():
    assert maglev.table([]) == []
    assert maglev.pick([], 7) == -1
    assert set(maglev.table(["only:1"])) == {0}
    with pytest.raises(ValueError):
        maglev.table(["a:1"], m=1000)
    assert len(maglev.table(["a:1"], m=251)) == 251  # an explicit size is kept
