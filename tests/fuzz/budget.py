"""The checks every fuzz input goes through: no undeclared exception, and for an input of at most
MAX_INPUT bytes no more than TIME_BUDGET of CPU and MEMORY_BUDGET of allocation.

The issue-19 bug was a timeout, not an exception: a 214-byte Kafka request cost 11 s of CPU, and
"never raises" fuzzing could not see it. Time is the thread's CPU time, so other processes on the
machine do not make an input slow; an input over budget is run again (after a full collection)
and is a finding only if every re-run is over budget too, which leaves out first-call costs
(imports, caches, a compiled regex) and a garbage collection that happened to fall on it.
Allocation is measured with tracemalloc on a re-run only, so the hot loop stays fast: an input is
re-run under tracemalloc when it was slow, when the process's peak RSS grew during it, or when
`sample` says so (the fuzz driver samples one input in SAMPLE_EVERY).
"""

from __future__ import annotations

import gc
import resource
import time
import traceback
import tracemalloc
from dataclasses import dataclass

MAX_INPUT = 4096
TIME_BUDGET = 0.010  # seconds of CPU per input
MEMORY_BUDGET = 4 << 20  # bytes allocated at the peak of one input
RERUNS = 3
SAMPLE_EVERY = 64


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str  # "exception", "slow" or "memory"
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _call(target, data: bytes) -> Finding | None:
    try:
        target.run(data)
    except target.errors:
        pass
    except Exception as exc:  # noqa: BLE001 - anything undeclared is what we look for
        return Finding("exception", "".join(traceback.format_exception(exc, limit=-8)))
    return None


def check(target, data: bytes, sample: bool = False) -> Finding | None:
    """Run `data` through `target` once; re-check a suspect run. None: the input is fine."""
    rss = _peak_rss()
    start = time.thread_time()
    finding = _call(target, data)
    took = time.thread_time() - start
    if finding is not None or len(data) > MAX_INPUT:
        return finding
    if took > TIME_BUDGET:
        finding = confirm_time(target, data)
        if finding is not None:
            return finding
    if took > TIME_BUDGET or sample or _peak_rss() > rss:
        return confirm_memory(target, data)
    return None


def confirm_time(target, data: bytes) -> Finding | None:
    """Over budget on every one of RERUNS runs: a finding (the fastest run is reported)."""
    best = float("inf")
    for _ in range(RERUNS):
        gc.collect()
        start = time.thread_time()
        _call(target, data)
        best = min(best, time.thread_time() - start)
        if best <= TIME_BUDGET:
            return None
    return Finding("slow", f"{best * 1e3:.1f} ms of CPU for {len(data)} bytes "
                           f"(budget {TIME_BUDGET * 1e3:.0f} ms)")  # fmt: skip


def confirm_memory(target, data: bytes) -> Finding | None:
    gc.collect()
    tracemalloc.start()
    try:
        _call(target, data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if peak > MEMORY_BUDGET:
        return Finding("memory", f"{peak / 1048576:.1f} MiB allocated at the peak for "
                                 f"{len(data)} bytes (budget {MEMORY_BUDGET >> 20} MiB)")  # fmt: skip
    return None
