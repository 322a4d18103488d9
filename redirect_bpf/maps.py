"""A typed BPF map handle over a plain fd (fresh from bcc or re-opened from a pin)."""

from __future__ import annotations

import contextlib
import ctypes as ct
import os
from collections.abc import Iterable, Iterator

from redirect_bpf import bpfsys


class BpfMap:
    def __init__(self, name: str, fd: int, key_type: type, value_type: type, percpu: bool = False):
        self.name = name
        self.fd = fd
        self.key_type = key_type
        self.value_type = value_type
        self.percpu = percpu
        info = bpfsys.fdinfo(fd)
        self.key_size = int(info["key_size"])
        self.value_size = int(info["value_size"])
        self.max_entries = int(info["max_entries"])
        self.map_type = int(info["map_type"])
        if self.key_size != ct.sizeof(key_type) or self.value_size != ct.sizeof(value_type):
            self.close()  # it owned the fd: a caller that gets the error has nothing to close
            raise ValueError(
                f"map {name}: kernel key/value size {self.key_size}/{self.value_size} differs "
                f"from the Python mirror {ct.sizeof(key_type)}/{ct.sizeof(value_type)}"
            )

    def _slot(self):
        if not self.percpu:
            return self.value_type()
        return (self.value_type * bpfsys.possible_cpus())()

    def get(self, key):
        value = self._slot()
        return value if bpfsys.map_lookup(self.fd, key, value) else None

    def put(self, key, value, flags: int = bpfsys.BPF_ANY) -> None:
        bpfsys.map_update(self.fd, key, value, flags)

    def delete(self, key) -> bool:
        return bpfsys.map_delete(self.fd, key)

    def put_raw(self, key: bytes, value: bytes, flags: int = bpfsys.BPF_ANY) -> None:
        """Key and value already laid out as the C structs (sync's fast path)."""
        bpfsys.map_update(
            self.fd,
            ct.create_string_buffer(key, len(key)),
            ct.create_string_buffer(value, len(value)),
            flags,
        )

    def delete_raw(self, key: bytes) -> bool:
        return bpfsys.map_delete(self.fd, ct.create_string_buffer(key, len(key)))

    def put_many_raw(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """One batch syscall for many packed entries (single updates if unsupported)."""
        if not pairs:
            return
        keys = b"".join(k for k, _ in pairs)
        values = b"".join(v for _, v in pairs)
        if len(pairs) > 1 and bpfsys.map_update_batch(self.fd, keys, values, len(pairs)):
            return
        for k, v in pairs:
            self.put_raw(k, v)

    def delete_many_raw(self, keys: list[bytes]) -> None:
        if len(keys) > 1 and bpfsys.map_delete_batch(self.fd, b"".join(keys), len(keys)):
            return
        for k in keys:
            self.delete_raw(k)

    def keys(self) -> Iterator:
        """All keys; safe against deletion of the current key while iterating (snapshot)."""
        found = []
        prev = None
        while True:
            nxt = self.key_type()
            if not bpfsys.map_next_key(self.fd, prev, nxt):
                break
            found.append(nxt)
            prev = nxt
        return iter(found)

    def items(self) -> Iterator[tuple]:
        for key in self.keys():
            value = self.get(key)
            if value is not None:
                yield key, value

    def put_many(self, pairs: Iterable[tuple]) -> int:
        n = 0
        for key, value in pairs:
            bpfsys.map_update(self.fd, key, value)
            n += 1
        return n

    def delete_many(self, keys: Iterable) -> int:
        return sum(1 for key in keys if bpfsys.map_delete(self.fd, key))

    def clear(self) -> int:
        return self.delete_many(list(self.keys()))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_pinned_maps(pin_dir, specs: dict) -> dict[str, BpfMap]:
    """Every map of `specs` ({name: (key type, value type[, percpu])}) from its pin `map_NAME`;
    on an error (a missing pin, another layout) the maps opened so far are closed first."""
    maps: dict[str, BpfMap] = {}
    try:
        for name, spec in specs.items():
            maps[name] = BpfMap(name, bpfsys.obj_get(pin_dir / f"map_{name}"), *spec)
    except Exception:
        for m in maps.values():
            m.close()
        raise
    return maps


def release(maps: dict[str, BpfMap], fds, bpf) -> None:
    """Drop a loaded object's fds (maps, programs, others) and its bcc module, if any; the pinned
    objects and their attachments stay in the kernel."""
    for m in maps.values():
        m.close()
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    if bpf is not None:
        bpf.cleanup()
