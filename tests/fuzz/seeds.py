"""Seed corpora from the project's existing test vectors: `python -m tests.fuzz.seeds` writes
tests/fuzz/corpus/<target>/seed-<n> (committed; the replay test runs them, the fuzzer starts
from them). Each seed is in the chunk format of chunks.py, with the first byte the target's
mode byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tests.fuzz.budget import MAX_INPUT
from tests.fuzz.chunks import CLIENT, SERVER, join, pieces

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
REGRESSIONS = HERE / "regressions"

_RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n",
    b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nbody until close",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n",
]


def http1_seeds() -> list[bytes]:
    from tests.unit.http1.h11_oracle import BASES

    extra = [
        b"GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n\x16\x03\x01",
        b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc",
    ]
    seeds = []
    for i, raw in enumerate([*BASES, *extra]):
        response = _RESPONSES[i % len(_RESPONSES)]
        chunks = [(CLIENT, p) for p in pieces(raw, (len(raw) // 3, len(raw) // 2))]
        chunks.append((SERVER, response))
        seeds.append(bytes([i % 8]) + join(chunks))
    return seeds


def http2_seeds() -> list[bytes]:
    from tests.unit.http2.test_fuzz import _corpus

    client, server = _corpus()
    seeds = []
    for mode, cuts in ((0, (24, 60)), (2, (100, 200)), (3, (len(client) // 2,))):
        c = pieces(client, cuts)
        s = pieces(server, (len(server) // 2,))
        order = [(CLIENT, c[0]), (SERVER, s[0])] + [(CLIENT, p) for p in c[1:]] + [(SERVER, s[1])]
        seeds.append(bytes([mode]) + join(order))
    return seeds


def kafka_seeds() -> list[bytes]:
    """A request and its answer for every API key at its newest version and the version before
    its first flexible one, under each of the three policies in turn."""
    from parsers.kafka.apis import API_TABLE
    from tests.unit.kafka.samples import sample
    from tests.unit.kafka.test_layer import produce, request, response

    seeds = []
    n = 0
    for key, spec in sorted(API_TABLE.items()):
        flex = spec.flexible_min
        for version in sorted({spec.versions[1], max(spec.versions[0], (flex or 1) - 1)}):
            body = produce(["t1"]) if key == 0 else sample(spec.request_fields, version)
            req = request(key, version, 7, body)
            try:
                resp = response(key, version, 7, sample(spec.response_fields, version))
            except (TypeError, ValueError, OverflowError):
                resp = b""
            cut = 16 if key == 0 else 0  # Produce seeds cut through early (targets.run_kafka)
            if cut:
                req = request(key, version, 7, produce(["t1"] * 2 if n % 2 else ["t1"]))
            chunks = [(CLIENT, p) for p in pieces(req, (100, 160) if cut else ())]
            chunks += [(SERVER, p) for p in pieces(resp, (6,))]
            seed = bytes([n % 3 | (4 if n % 5 == 0 else 0) | 8 | cut]) + join(chunks)
            if len(seed) <= MAX_INPUT:
                seeds.append(seed)
            n += 1
    return seeds


def policy_seeds() -> list[bytes]:
    root = HERE.parent / "policies"
    return [p.read_bytes() for p in sorted(root.glob("*/*")) if p.is_file()]


def dns_seeds() -> list[bytes]:
    import dns.message
    import dns.rrset

    seeds = []
    for name, qtype in (("a.example.com.", "A"), ("b.example.com.", "AAAA"), ("x.test.", "TXT")):
        query = dns.message.make_query(name, qtype)
        answer = dns.message.make_response(query)
        answer.answer.append(dns.rrset.from_text("c." + name, 30, "IN", "A", "192.0.2.1"))
        answer.answer.insert(0, dns.rrset.from_text(name, 60, "IN", "CNAME", "c." + name))
        seeds += [query.to_wire(), answer.to_wire()]
        seeds.append(len(seeds[-2]).to_bytes(2, "big") + seeds[-2])
    return seeds


SEEDS = {
    "http1": http1_seeds,
    "http2": http2_seeds,
    "kafka": kafka_seeds,
    "policy": policy_seeds,
    "dns": dns_seeds,
}


def write_seeds(only=None) -> None:
    for target, build in SEEDS.items():
        if only and target not in only:
            continue
        folder = CORPUS / target
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for data in build():
            name = "seed-" + hashlib.sha1(data).hexdigest()[:16]
            (folder / name).write_bytes(data)
        print(f"{target}: {len(list(folder.glob('seed-*')))} seeds")


if __name__ == "__main__":
    import sys

    write_seeds(sys.argv[1:])
