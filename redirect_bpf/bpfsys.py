"""Thin ctypes access to libbpf's low-level calls: pin/get objects, map element ops, cgroup attach,
ring buffers, and the kernel's fdinfo for maps and programs.

bcc only compiles and loads; everything a restarted agent needs (pinned maps and programs) works
through here without compiling anything.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
from functools import cache
from pathlib import Path

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

SAMPLE_FN = ct.CFUNCTYPE(ct.c_int, ct.c_void_p, ct.c_void_p, ct.c_size_t)


@cache
def lib() -> ct.CDLL:
    so = ct.CDLL("libbpf.so.1", use_errno=True)
    vp, i, u32, u64, cp = ct.c_void_p, ct.c_int, ct.c_uint32, ct.c_uint64, ct.c_char_p
    sigs = {
        "bpf_obj_pin": (i, [i, cp]),
        "bpf_obj_get": (i, [cp]),
        "bpf_map_update_elem": (i, [i, vp, vp, u64]),
        "bpf_map_lookup_elem": (i, [i, vp, vp]),
        "bpf_map_delete_elem": (i, [i, vp]),
        "bpf_map_get_next_key": (i, [i, vp, vp]),
        "bpf_prog_attach": (i, [i, i, i, ct.c_uint]),
        "bpf_prog_detach2": (i, [i, i, i]),
        "bpf_prog_query": (
            i,
            [i, i, u32, ct.POINTER(u32), ct.POINTER(u32), ct.POINTER(u32)],
        ),
        "ring_buffer__new": (vp, [i, SAMPLE_FN, vp, vp]),
        "ring_buffer__poll": (i, [vp, i]),
        "ring_buffer__free": (None, [vp]),
        "bpf_map_update_batch": (i, [i, vp, vp, ct.POINTER(u32), vp]),
        "bpf_map_delete_batch": (i, [i, vp, ct.POINTER(u32), vp]),
        "bpf_map_lookup_batch": (i, [i, vp, vp, vp, vp, ct.POINTER(u32), vp]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(so, name)
        fn.restype, fn.argtypes = restype, argtypes
    return so


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ct.get_errno() or -ret
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def obj_pin(fd: int, path: str | Path) -> None:
    _check(lib().bpf_obj_pin(fd, str(path).encode()), f"pin {path}")


def obj_get(path: str | Path) -> int:
    return _check(lib().bpf_obj_get(str(path).encode()), f"open pinned {path}")


def pins_present(pin_dir: Path, names) -> bool:
    """Every pin `names` exists under `pin_dir`."""
    return all((pin_dir / n).exists() for n in names)


def unlink_pins(pin_dir: Path, names) -> None:
    """Remove the pins `names` under `pin_dir` (absent ones are fine)."""
    for name in names:
        try:
            (pin_dir / name).unlink()
        except FileNotFoundError:
            pass


def map_update(fd: int, key: ct.Structure, value, flags: int = BPF_ANY) -> None:
    _check(lib().bpf_map_update_elem(fd, ct.byref(key), ct.byref(value), flags), "map update")


def map_lookup(fd: int, key, value) -> bool:
    if lib().bpf_map_lookup_elem(fd, ct.byref(key), ct.byref(value)) == 0:
        return True
    if ct.get_errno() == errno.ENOENT:
        return False
    _check(-ct.get_errno(), "map lookup")
    return False


def map_delete(fd: int, key) -> bool:
    if lib().bpf_map_delete_elem(fd, ct.byref(key)) == 0:
        return True
    if ct.get_errno() == errno.ENOENT:
        return False
    _check(-ct.get_errno(), "map delete")
    return False


def map_update_batch(fd: int, keys: bytes, values: bytes, count: int) -> bool:
    """Write `count` packed keys/values in one syscall; False if the map type has no batch
    support (the caller falls back to single updates)."""
    kbuf = ct.create_string_buffer(keys, len(keys))
    vbuf = ct.create_string_buffer(values, len(values))
    n = ct.c_uint32(count)
    if lib().bpf_map_update_batch(fd, kbuf, vbuf, ct.byref(n), None) == 0:
        return True
    if ct.get_errno() in (errno.EINVAL, errno.ENOTSUPP, errno.EOPNOTSUPP) and n.value == 0:
        return False
    _check(-ct.get_errno(), f"map update batch ({n.value} of {count} written)")
    return False


def map_delete_batch(fd: int, keys: bytes, count: int) -> bool:
    kbuf = ct.create_string_buffer(keys, len(keys))
    n = ct.c_uint32(count)
    if lib().bpf_map_delete_batch(fd, kbuf, ct.byref(n), None) == 0:
        return True
    if ct.get_errno() in (errno.EINVAL, errno.ENOTSUPP, errno.EOPNOTSUPP) and n.value == 0:
        return False
    _check(-ct.get_errno(), f"map delete batch ({n.value} of {count} deleted)")
    return False


def map_lookup_batches(fd: int, key_size: int, value_size: int, chunk: int = 4096):
    """Yield (keys, values, count) chunks of a hash map's entries, one syscall per chunk.
    Raises NotImplementedError when the map type has no batch lookup."""
    keys = ct.create_string_buffer(key_size * chunk)
    values = ct.create_string_buffer(value_size * chunk)
    token_in, token_out = ct.create_string_buffer(8), ct.create_string_buffer(8)
    first = True
    while True:
        n = ct.c_uint32(chunk)
        ret = lib().bpf_map_lookup_batch(
            fd, None if first else token_in, token_out, keys, values, ct.byref(n), None
        )
        err = ct.get_errno() if ret < 0 else 0
        if ret < 0 and err != errno.ENOENT:
            if first and err in (errno.EINVAL, errno.ENOTSUPP, errno.EOPNOTSUPP):
                raise NotImplementedError("no batch lookup for this map")
            _check(-err, "map lookup batch")
        if n.value:
            yield keys.raw[: key_size * n.value], values.raw[: value_size * n.value], n.value
        if err == errno.ENOENT:
            return
        ct.memmove(token_in, token_out, 8)
        first = False


def map_next_key(fd: int, key, next_key) -> bool:
    """Fill next_key with the key after `key` (None: the first key); False at the end."""
    ptr = ct.byref(key) if key is not None else None
    if lib().bpf_map_get_next_key(fd, ptr, ct.byref(next_key)) == 0:
        return True
    if ct.get_errno() == errno.ENOENT:
        return False
    _check(-ct.get_errno(), "map next key")
    return False


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> None:
    _check(lib().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "prog attach")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(lib().bpf_prog_detach2(prog_fd, target_fd, attach_type), "prog detach")


def attached_prog_ids(target_fd: int, attach_type: int) -> set[int]:
    """Ids of the programs attached to a cgroup for one attach type."""
    ids = (ct.c_uint32 * 64)()
    count = ct.c_uint32(64)
    flags = ct.c_uint32(0)
    _check(
        lib().bpf_prog_query(target_fd, attach_type, 0, ct.byref(flags), ids, ct.byref(count)),
        "prog query",
    )
    return set(ids[: count.value])


def prog_id(fd: int) -> int:
    return int(fdinfo(fd)["prog_id"])


def fdinfo(fd: int) -> dict[str, str]:
    """The kernel's description of a BPF map or program fd (type, sizes, run_time_ns...)."""
    out = {}
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key.strip()] = value.strip()
    return out


@cache
def possible_cpus() -> int:
    """Per-CPU map values hold one slot per possible CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


class _TestRunOpts(ct.Structure):
    _fields_ = [
        ("sz", ct.c_size_t),
        ("data_in", ct.c_void_p),
        ("data_out", ct.c_void_p),
        ("data_size_in", ct.c_uint32),
        ("data_size_out", ct.c_uint32),
        ("ctx_in", ct.c_void_p),
        ("ctx_out", ct.c_void_p),
        ("ctx_size_in", ct.c_uint32),
        ("ctx_size_out", ct.c_uint32),
        ("retval", ct.c_uint32),
        ("repeat", ct.c_int),
        ("duration", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("cpu", ct.c_uint32),
        ("batch_size", ct.c_uint32),
    ]


# struct __sk_buff up to ifindex is enough for tc test runs (the kernel zero-checks the rest).
SKB_IFINDEX_OFFSET = 40
SKB_CTX_SIZE = 192


def test_run_skb(prog_fd: int, packet: bytes, *, ifindex: int = 1, repeat: int = 1):
    """BPF_PROG_TEST_RUN of a tc program on one packet: (return code, mean ns per run)."""
    fn = lib().bpf_prog_test_run_opts
    fn.restype, fn.argtypes = ct.c_int, [ct.c_int, ct.c_void_p]
    data = ct.create_string_buffer(packet, len(packet))
    out = ct.create_string_buffer(len(packet) + 256)
    ctx = ct.create_string_buffer(SKB_CTX_SIZE)
    ct.c_uint32.from_buffer(ctx, SKB_IFINDEX_OFFSET).value = ifindex
    opts = _TestRunOpts(
        sz=ct.sizeof(_TestRunOpts),
        data_in=ct.cast(data, ct.c_void_p),
        data_out=ct.cast(out, ct.c_void_p),
        data_size_in=len(packet),
        data_size_out=len(out),
        ctx_in=ct.cast(ctx, ct.c_void_p),
        ctx_size_in=SKB_CTX_SIZE,
        repeat=repeat,
    )
    _check(fn(prog_fd, ct.byref(opts)), "prog test run")
    return opts.retval, opts.duration
