"""Mutated requests and responses never raise out of the layer: each one is forwarded, answered
or closes the connection. A short deterministic run is part of the unit tests; the long run
carries the `fuzz` marker (L7PROXY_FUZZ=1)."""

from __future__ import annotations

import random

import pytest

from l7proxy.kafka.layer import Close, ResolveTopicIds
from parsers.kafka.apis import API_TABLE
from tests.unit.kafka.samples import sample
from tests.unit.kafka.test_layer import PRODUCE_ONLY_T1, layer, request, response


def _seeds():
    out = []
    for key, spec in sorted(API_TABLE.items()):
        flex = spec.flexible_min
        versions = {spec.versions[1], max(spec.versions[0], (flex or 1) - 1)}
        for version in sorted(versions):
            out.append(
                (key, version, request(key, version, 7, sample(spec.request_fields, version)))
            )
    return out


SEEDS = _seeds()


def _mutate(rnd: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        if len(buf) <= 5:
            break
        choice = rnd.random()
        pos = rnd.randrange(4, len(buf))
        if choice < 0.7:
            buf[pos] = rnd.randrange(256)
        elif choice < 0.85:
            buf[pos] = 0xFF  # -1 lengths, huge varints
        else:
            del buf[pos:]
            buf[0:4] = (len(buf) - 4).to_bytes(4, "big")  # truncated body, consistent frame
    return bytes(buf)


def _run(iterations: int, seed: int) -> None:
    rnd = random.Random(seed)
    for i in range(iterations):
        key, version, raw = rnd.choice(SEEDS)
        lay = layer(PRODUCE_ONLY_T1 if i % 2 else None)
        out = lay.client_data(_mutate(rnd, raw))
        if any(isinstance(c, ResolveTopicIds) for c in out):
            # An id no Metadata named: the session's lookup finds it half the time.
            if rnd.random() < 0.5:
                for c in out:
                    if isinstance(c, ResolveTopicIds):
                        lay.topic_names.update(dict.fromkeys(c.ids, "t1"))
            out = lay.topic_ids_resolved()
        assert all(not isinstance(c, Close) or c.reason for c in out)
        if lay.closed or not lay.in_flight:
            continue
        # A response for what was forwarded, mutated as well.
        spec = API_TABLE[key]
        body = sample(spec.response_fields, version)
        try:
            resp = response(key, version, 7, body)
        except (TypeError, ValueError, OverflowError):
            continue
        lay.upstream_data(_mutate(rnd, resp))


def test_mutated_traffic_never_raises():
    _run(3000, 6)


@pytest.mark.fuzz
def test_mutated_traffic_never_raises_long():
    _run(300_000, random.randrange(1 << 30))
