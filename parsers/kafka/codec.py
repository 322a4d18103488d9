"""Interpret the schema tables: compile (fields, version, flexible) into a decoder and an encoder.

Values are plain dicts keyed by snake_case field names. Tagged fields are kept raw under "_tags"
as a list of (tag, bytes) so that a decoded message re-encodes byte for byte; fields the caller
leaves out are written with the spec default. Record batches ("records") are never decoded: the
decoder hands back a memoryview slice and the encoder writes it through unchanged.

Counts and lengths from the wire are checked before anything is allocated or looped over: an
array of N elements needs N times its element's smallest encoding in the bytes that remain, a
tagged-field section two bytes per field, and a negative length other than null (-1; compact
forms cannot be lower) is a DecodeError. Every element read moves forward, so decoding costs at
most a constant per byte of input. That constant is large in Python (a dict per struct element):
`decode_bounded` also caps the array elements of one message in all (requests: the layer's
max_request_elements), checked as each count is read, before its elements are decoded.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from functools import cache
from typing import Any

OPEN = 0x7FFF
_I8 = struct.Struct(">b")
_I16 = struct.Struct(">h")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_F64 = struct.Struct(">d")
ZERO_UUID = bytes(16)


class DecodeError(ValueError):
    """The bytes do not match the schema (truncated, negative length, bad varint)."""


class _Budget(threading.local):
    left = -1  # array elements the message being decoded may still hold; -1: no bound
    limit = -1


_budget = _Budget()


def decode_bounded(codec, buf: memoryview, pos: int, max_elements: int) -> tuple[Any, int]:
    """`codec.decode(buf, pos)` refusing (DecodeError) a message whose arrays hold more than
    `max_elements` elements in all, nested ones included, before decoding them."""
    budget = _budget
    budget.left = budget.limit = max_elements
    try:
        return codec.decode(buf, pos)
    finally:
        budget.left = budget.limit = -1


Decoder = Callable[[memoryview, int], tuple[Any, int]]
Encoder = Callable[[bytearray, Any], None]


def read_uvarint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = 0
    shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise DecodeError("varint longer than 5 bytes")


def write_uvarint(out: bytearray, value: int) -> None:
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _in(rng: tuple[int, int] | None, version: int) -> bool:
    return rng is not None and rng[0] <= version <= rng[1]


def _fixed(st: struct.Struct) -> tuple[Decoder, Encoder]:
    size = st.size
    unpack, pack = st.unpack_from, st.pack

    def dec(buf, pos):
        if pos + size > len(buf):
            raise DecodeError("truncated")
        return unpack(buf, pos)[0], pos + size

    def enc(out, value):
        out += pack(value)

    return dec, enc


def _bool() -> tuple[Decoder, Encoder]:
    def dec(buf, pos):
        if pos >= len(buf):
            raise DecodeError("truncated")
        return buf[pos] != 0, pos + 1

    def enc(out, value):
        out.append(1 if value else 0)

    return dec, enc


def _uuid() -> tuple[Decoder, Encoder]:
    def dec(buf, pos):
        if pos + 16 > len(buf):
            raise DecodeError("truncated uuid")
        return bytes(buf[pos : pos + 16]), pos + 16

    def enc(out, value):
        out += value or ZERO_UUID

    return dec, enc


def _length_reader(flexible: bool, wide: bool) -> Decoder:
    """Read a length prefix; -1 means null. Compact lengths are stored as N+1."""
    if flexible:

        def read(buf, pos):
            n, pos = read_uvarint(buf, pos)
            return n - 1, pos

        return read
    return _fixed(_I32 if wide else _I16)[0]


def _length_writer(flexible: bool, wide: bool) -> Encoder:
    if flexible:
        return lambda out, n: write_uvarint(out, n + 1)
    return _fixed(_I32 if wide else _I16)[1]


def _blob(kind: str, flexible: bool, nullable: bool) -> tuple[Decoder, Encoder]:
    """string, bytes and records share one shape: a length then that many bytes."""
    read_len = _length_reader(flexible, wide=kind != "string")
    write_len = _length_writer(flexible, wide=kind != "string")
    as_text = kind == "string"

    def dec(buf, pos):
        n, pos = read_len(buf, pos)
        if n < 0:
            if n != -1:
                raise DecodeError(f"negative {kind} length {n}")
            return None, pos
        end = pos + n
        if end > len(buf):
            raise DecodeError(f"truncated {kind}")
        if as_text:
            return str(buf[pos:end], "utf-8"), end
        if kind == "bytes":
            return bytes(buf[pos:end]), end
        return buf[pos:end], end

    def enc(out, value):
        if value is None:
            write_len(out, -1)
            return
        data = value.encode() if as_text else value
        write_len(out, len(data))
        out += data

    return dec, enc


def _array(
    item: tuple[Decoder, Encoder], flexible: bool, item_size: int
) -> tuple[Decoder, Encoder]:
    """`item_size`: the smallest encoding of one element (at least 1 byte is assumed)."""
    read_len = _length_reader(flexible, wide=True)
    write_len = _length_writer(flexible, wide=True)
    item_dec, item_enc = item
    item_size = max(item_size, 1)

    def dec(buf, pos):
        n, pos = read_len(buf, pos)
        if n < 0:
            if n != -1:
                raise DecodeError(f"negative array length {n}")
            return None, pos
        if n * item_size > len(buf) - pos:
            raise DecodeError(f"array of {n} cannot fit in {len(buf) - pos} bytes")
        budget = _budget
        if budget.left >= 0:
            budget.left -= n
            if budget.left < 0:
                raise DecodeError(f"more than {budget.limit} array elements in one message")
        items = []
        append = items.append
        for _ in range(n):
            value, pos = item_dec(buf, pos)
            append(value)
        return items, pos

    def enc(out, value):
        if value is None:
            write_len(out, -1)
            return
        write_len(out, len(value))
        for v in value:
            item_enc(out, v)

    return dec, enc


_FIXED_SIZES = {"int8": 1, "int16": 2, "uint16": 2, "int32": 4, "int64": 8, "float64": 8,
                "bool": 1, "uuid": 16}  # fmt: skip


def _min_size(kind: str, flexible: bool) -> int:
    """Smallest encoding of a primitive or an array: a length prefix alone (null or empty)."""
    if kind in _FIXED_SIZES:
        return _FIXED_SIZES[kind]
    if flexible:
        return 1  # uvarint length
    return 2 if kind == "string" else 4  # int16 string length; int32 bytes/records/array length


_PRIMITIVE_DEFAULTS = {
    "bool": False,
    "int8": 0,
    "int16": 0,
    "uint16": 0,
    "int32": 0,
    "int64": 0,
    "float64": 0.0,
    "uuid": ZERO_UUID,
    "string": "",
    "bytes": b"",
    "records": None,
}


def _field_codec(field: tuple, version: int, flexible: bool) -> tuple[Decoder, Encoder, Any, int]:
    """(decoder, encoder, default, smallest encoded size) of one field."""
    name, kind, _versions, nullable_versions, _tag, _tv, default, children = field
    nullable = _in(nullable_versions, version)
    if kind == "{}" or kind == "[]":
        sub = compile_struct(children, version, flexible)
        item = (sub.decode, sub.encode)
        if kind == "[]":
            dec, enc = _array(item, flexible, sub.min_size)
            return dec, enc, None if default == "null" else [], _min_size(kind, flexible)
        if nullable:
            return (*_nullable_struct(item), None, 1)
        return item[0], item[1], sub.defaults(), sub.min_size
    if kind.startswith("[]"):
        inner = kind[2:]
        dec, enc = _array(_primitive(inner, flexible, False), flexible, _min_size(inner, flexible))
        return dec, enc, None if default == "null" else [], _min_size(kind, flexible)
    dec, enc = _primitive(kind, flexible, nullable)
    if default == "null":
        value = None
    elif default is None:
        value = _PRIMITIVE_DEFAULTS[kind]
    elif kind == "uuid":
        value = ZERO_UUID
    else:
        value = default
    return dec, enc, value, _min_size(kind, flexible)


def _nullable_struct(item: tuple[Decoder, Encoder]) -> tuple[Decoder, Encoder]:
    item_dec, item_enc = item

    def dec(buf, pos):
        marker, pos = _fixed(_I8)[0](buf, pos)
        if marker < 0:
            return None, pos
        return item_dec(buf, pos)

    def enc(out, value):
        if value is None:
            out += _I8.pack(-1)
            return
        out += _I8.pack(1)
        item_enc(out, value)

    return dec, enc


@cache
def _primitive(kind: str, flexible: bool, nullable: bool) -> tuple[Decoder, Encoder]:
    if kind == "int8":
        return _fixed(_I8)
    if kind == "int16":
        return _fixed(_I16)
    if kind == "uint16":
        return _fixed(_U16)
    if kind == "int32":
        return _fixed(_I32)
    if kind == "int64":
        return _fixed(_I64)
    if kind == "float64":
        return _fixed(_F64)
    if kind == "bool":
        return _bool()
    if kind == "uuid":
        return _uuid()
    if kind in ("string", "bytes", "records"):
        return _blob(kind, flexible, nullable)
    raise ValueError(f"unknown field kind {kind!r}")


def read_tags(buf: memoryview, pos: int) -> tuple[list[tuple[int, bytes]], int]:
    if pos < len(buf) and buf[pos] == 0:
        return [], pos + 1  # no tagged fields: nearly every struct
    count, pos = read_uvarint(buf, pos)
    if count * 2 > len(buf) - pos:  # each field: at least a tag and a size byte
        raise DecodeError(f"{count} tagged fields cannot fit in {len(buf) - pos} bytes")
    tags = []
    for _ in range(count):
        tag, pos = read_uvarint(buf, pos)
        size, pos = read_uvarint(buf, pos)
        if pos + size > len(buf):
            raise DecodeError("truncated tagged field")
        tags.append((tag, bytes(buf[pos : pos + size])))
        pos += size
    return tags, pos


def write_tags(out: bytearray, tags: list[tuple[int, bytes]] | None) -> None:
    if not tags:
        out.append(0)
        return
    write_uvarint(out, len(tags))
    for tag, data in sorted(tags):
        write_uvarint(out, tag)
        write_uvarint(out, len(data))
        out += data


class StructCodec:
    """One struct at one version: `decode(buf, pos) -> (dict, pos)`, `encode(out, dict)`."""

    __slots__ = ("decode", "encode", "names", "min_size", "_defaults")

    def __init__(self, fields: tuple, version: int, flexible: bool):
        plan = []
        # The smallest encoding of this struct: its fields' smallest, plus the tag count.
        self.min_size = 1 if flexible else 0
        for field in fields:
            name, _kind, versions, _nv, tag, tagged_versions, _d, _c = field
            if not _in(versions, version):
                continue
            if tag is not None and _in(tagged_versions, version):
                continue  # tagged fields travel raw in "_tags"
            dec, enc, default, size = _field_codec(field, version, flexible)
            plan.append((name, dec, enc, default))
            self.min_size += size
        self.names = tuple(p[0] for p in plan)
        self._defaults = {p[0]: p[3] for p in plan}
        decoders = tuple((p[0], p[1]) for p in plan)
        encoders = tuple((p[0], p[2], p[3]) for p in plan)

        def decode(buf, pos):
            value = {}
            for name, dec in decoders:
                value[name], pos = dec(buf, pos)
            if flexible:
                value["_tags"], pos = read_tags(buf, pos)
            return value, pos

        def encode(out, value):
            get = value.get
            for name, enc, default in encoders:
                v = get(name, default)
                enc(out, _fresh(default) if v is default else v)
            if flexible:
                write_tags(out, get("_tags"))

        self.decode = decode
        self.encode = encode

    def defaults(self) -> dict:
        return {k: _fresh(v) for k, v in self._defaults.items()}


def _fresh(value):
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return value


_cache: dict[tuple[int, int, bool], StructCodec] = {}


def compile_struct(fields: tuple, version: int, flexible: bool) -> StructCodec:
    key = (id(fields), version, flexible)
    codec = _cache.get(key)
    if codec is None:
        codec = _cache[key] = StructCodec(fields, version, flexible)
    return codec
