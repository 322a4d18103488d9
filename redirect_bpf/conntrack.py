"""Conntrack garbage collection: the programs set each entry's expiry (TCP-state aware); userspace
deletes what has expired, in batches where the kernel has them, on a daemon thread."""

from __future__ import annotations

import threading
import time

from redirect_bpf import bpfsys


def gc(ct, now_ns: int | None = None) -> int:
    """Delete expired entries of the conntrack map `ct`; returns how many."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    ks, vs = ct.key_size, ct.value_size
    try:
        expired = []
        for keys, values, n in bpfsys.map_lookup_batches(ct.fd, ks, vs):
            for i in range(n):
                # expires_ns is the first field of struct ct_entry
                if int.from_bytes(values[i * vs : i * vs + 8], "little") <= now:
                    expired.append(keys[i * ks : (i + 1) * ks])
    except NotImplementedError:
        return ct.delete_many(k for k, v in ct.items() if v.expires_ns <= now)
    ct.delete_many_raw(expired)
    return len(expired)


def start_gc_thread(maps, interval: float) -> threading.Event:
    """Run gc() over each conntrack map (IPv4, IPv6) every `interval` seconds until the returned
    event is set."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                for ct in maps:
                    gc(ct)
            except OSError:
                return  # the maps were closed under us

    threading.Thread(target=loop, name="ct-gc", daemon=True).start()
    return stop
