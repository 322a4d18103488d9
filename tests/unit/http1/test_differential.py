"""Differential tests against h11 as the strict oracle: whatever we accept, h11 accepts and
reads the same way (method, target, version, headers, body, trailers)."""

import random

import pytest

from tests.unit.http1.h11_oracle import BASES, disagreement, mutate, ours


def test_bases_agree_with_h11():
    for raw in BASES:
        assert ours(raw) not in ("error", None)
        assert disagreement(raw) is None


def test_twenty_thousand_mutations_never_accept_what_h11_rejects():
    rng = random.Random(20261126)
    bad = [d for _ in range(20_000) if (d := disagreement(mutate(rng, rng.choice(BASES))))]
    assert bad == []


@pytest.mark.fuzz
@pytest.mark.timeout(1800)
def test_fuzz_one_million_inputs():
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    bad = []
    for _ in range(1_000_000):
        raw = mutate(rng, rng.choice(BASES))
        if d := disagreement(raw):
            bad.append(d)
            if len(bad) > 10:
                break
    assert bad == [], f"seed {seed}"
