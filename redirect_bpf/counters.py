"""Reading the datapath's per-CPU verdict counters and the programs' run statistics."""

from __future__ import annotations

from collections.abc import Mapping

from redirect_bpf import bpfsys, structs


def read(counters) -> dict[tuple[str, str, str], tuple[int, int]]:
    """(direction, verdict, reason) -> (packets, bytes), summed over CPUs."""
    out = {}
    for slot in range(2 * 3 * structs.REASONS):
        per_cpu = counters.get(structs.u32(slot))
        packets = sum(c.packets for c in per_cpu)
        if not packets:
            continue
        direction, rest = divmod(slot, 3 * structs.REASONS)
        verdict, reason = divmod(rest, structs.REASONS)
        key = (
            structs.DIRECTION_NAMES[direction],
            structs.VERDICT_NAMES[verdict],
            structs.REASON_NAMES.get(reason, str(reason)),
        )
        out[key] = (packets, sum(c.bytes for c in per_cpu))
    return out


def prog_stats(progs: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """name -> (run_time_ns, run_cnt); counts only while kernel.bpf_stats_enabled=1."""
    out = {}
    for name, fd in progs.items():
        info = bpfsys.fdinfo(fd)
        out[name] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
    return out
