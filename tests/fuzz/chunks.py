"""One fuzz input, many reads: the bytes are a sequence of chunks, each going one way.

A chunk is a 2-byte big-endian head (top bit: the direction, 0 towards the proxy from the
client, 1 from the upstream; the other 15 bits: its length, cut short by the input's end) and
that many bytes. Each chunk is one `receive_data` call, so the fuzzer also varies where reads
split frames and how the two directions interleave.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

CLIENT, SERVER = 0, 1


def split(data: bytes) -> Iterator[tuple[int, bytes]]:
    pos, end = 0, len(data)
    while end - pos >= 2:
        head = (data[pos] << 8) | data[pos + 1]
        pos += 2
        size = head & 0x7FFF
        yield head >> 15, data[pos : pos + size]
        pos += size


def join(chunks: Iterable[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    for direction, data in chunks:
        for i in range(0, max(len(data), 1), 0x7FFF):
            piece = data[i : i + 0x7FFF]
            out += ((direction << 15) | len(piece)).to_bytes(2, "big") + piece
    return bytes(out)


def pieces(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at the given offsets (for seeds split across reads)."""
    out, last = [], 0
    for cut in sorted(set(cuts)):
        if last < cut < len(data):
            out.append(data[last:cut])
            last = cut
    out.append(data[last:])
    return out
