"""Mutated frame streams never raise out of the relay: every input is either relayed or answered
with a protocol error (style rule 5: an error closes that connection, never the process)."""

from __future__ import annotations

import os
import random

import hpack
import pytest

from parsers.http2 import Decision, H2Relay
from parsers.http2 import frames as f
from parsers.http2.headers import encode_fields


def _get(path: str, sid: int, end_stream: bool = True) -> bytes:
    block = encode_fields(
        [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", path)]
    )
    return f.headers_frames(sid, block, end_stream)


def _corpus() -> tuple[bytes, bytes]:
    encoder = hpack.Encoder()
    post = encoder.encode(
        [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", "/private")]
    )
    client = b"".join(
        [
            f.PREFACE,
            f.settings_frame([(f.SETTINGS_INITIAL_WINDOW_SIZE, 100)]),
            _get("/public", 1),
            f.frame(f.HEADERS, 0, 3, post),
            f.frame(f.CONTINUATION, f.FLAG_END_HEADERS, 3, b""),
            f.data_frame(3, b"abc", False),
            f.window_update(0, 100),
            f.window_update(3, 5),
            f.frame(f.PING, 0, 0, bytes(8)),
            f.rst_stream(3, f.CANCEL),
            f.frame(f.PRIORITY, 0, 5, bytes(5)),
            _get("/x", 5, False),
            f.data_frame(5, b"q", True),
            f.goaway(0, f.NO_ERROR),
        ]
    )
    server = b"".join(
        [
            f.settings_frame([(f.SETTINGS_MAX_CONCURRENT_STREAMS, 10)]),
            f.SETTINGS_ACK,
            f.headers_frames(1, encode_fields([(":status", "200")]), False),
            f.data_frame(1, b"hello", True),
            f.frame(f.PING, 0, 0, bytes(8)),
            f.window_update(0, 1000),
            f.rst_stream(5, f.INTERNAL_ERROR),
            f.goaway(5, f.NO_ERROR),
        ]
    )
    return client, server


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        i = rng.randrange(len(b)) if b else 0
        if op < 0.5 and b:
            b[i] = rng.randrange(256)
        elif op < 0.7:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 9)))
        elif op < 0.9 and b:
            del b[i : i + rng.randint(1, 9)]
        else:
            b[i:i] = b[rng.randrange(len(b)) :][: rng.randint(1, 40)]
    return bytes(b)


def _run(seed: int, rounds: int) -> int:
    rng = random.Random(seed)
    client, server = _corpus()
    closed = 0
    for _ in range(rounds):
        relay = H2Relay(lambda r: Decision(not r.path.startswith("/private")))
        c = _mutate(rng, client) if rng.random() < 0.8 else client
        s = _mutate(rng, server) if rng.random() < 0.8 else server
        cuts = sorted(rng.randrange(len(c)) for _ in range(2))
        relay.receive_client(c[: cuts[0]])
        relay.receive_server(s[: len(s) // 2])
        relay.receive_client(c[cuts[0] : cuts[1]])
        relay.receive_server(s[len(s) // 2 :])
        relay.receive_client(c[cuts[1] :])
        relay.data_to_client()
        relay.data_to_server()
        closed += relay.closed
        relay.tick()
        relay.drain()
        relay.server_closed()
    return closed


def test_mutated_exchanges_never_raise():
    closed = _run(seed=5, rounds=1500)
    assert 0 < closed < 1500  # both outcomes happen: the corpus is neither all-valid nor all-broken


@pytest.mark.fuzz
def test_mutated_exchanges_never_raise_long():
    _run(seed=int(os.environ.get("L7PROXY_FUZZ_SEED", "1")), rounds=200_000)
