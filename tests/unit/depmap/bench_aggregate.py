"""How fast DepMap aggregates flows: `.venv/bin/python -m tests.unit.depmap.bench_aggregate`.

Not a test (no assertion on a noisy machine); the numbers go in docs/depmap.md.
"""

from __future__ import annotations

import json
import time

from l7proxy.depmap import DepMap

from .flows import DEATHSTAR, TIEFIGHTER, XWING, http_flow


def main() -> None:
    flows = [
        http_flow(TIEFIGHTER, DEATHSTAR, sport=i % 60000, l7_type="RESPONSE")
        for i in range(100_000)
    ]
    flows += [
        http_flow(XWING, DEATHSTAR, verdict="DROPPED", sport=i % 60000) for i in range(50_000)
    ]
    best = min(_time(lambda: DepMap().add_all(flows)) for _ in range(3))
    print(f"aggregate: {len(flows) / best:,.0f} flows/s ({1e6 * best / len(flows):.2f} us/flow)")

    wide = DepMap()
    wide.add_all(
        http_flow((1000 + i, [f"k8s:app=a{i}"]), (5000 + i % 50, [f"k8s:app=s{i % 50}"]), sport=i)
        for i in range(2000)
    )
    print(f"2000 edges: to_dict+json {1e3 * _time(lambda: json.dumps(wide.to_dict())):.1f} ms")
    since = wide.version - 1
    print(f"2000 edges: changes_since {1e3 * _time(lambda: wide.changes_since(since)):.2f} ms")


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
