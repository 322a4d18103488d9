"""Comparing a ctypes mirror with the type bcc compiled from the C source."""

from __future__ import annotations

import ctypes as ct


def layout(cls) -> list[tuple[str, int, int]]:
    """(field, offset, size) of a ctypes structure, in order."""
    return [(name, getattr(cls, name).offset, getattr(cls, name).size) for name, _ in cls._fields_]


def assert_map_mirrors(key, value, table, name: str) -> None:
    """A map's key and value mirrors have the compiled sizes, and the compiled layout where both
    sides are structures."""
    for mirror, compiled in ((key, table.Key), (value, table.Leaf)):
        assert ct.sizeof(mirror) == ct.sizeof(compiled), name
        if issubclass(compiled, ct.Structure) and issubclass(mirror, ct.Structure):
            assert layout(mirror) == layout(compiled), name
