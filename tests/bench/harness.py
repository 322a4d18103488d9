"""Side-by-side benchmark harness: one row per peer, ratios of the project against each peer.

Pure code (no processes, no sockets): a protocol scenario measures its peers with the runners in
`peers.py`, turns each measurement into a `Row`, and hands a `ScenarioResult` to the report. The
report prints one table for the whole run and writes it as JSON and Markdown. The project's row is
either a real measurement or "not available: <reason>"; it never carries an invented number.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PROJECT = "l7proxy"
DIRECT = "direct nginx"
DIRECT_GRPC = "direct grpcio"
ENVOY = "Envoy"
HAPROXY = "HAProxy"
PEER_ORDER = (DIRECT, DIRECT_GRPC, ENVOY, HAPROXY, PROJECT)


@dataclass(frozen=True, slots=True)
class Metric:
    """The main number of a scenario and which way is better."""

    name: str
    unit: str
    higher_is_better: bool


REQ_S = Metric("throughput", "req/s", True)
DENIED_S = Metric("403 rate", "403/s", True)
MIB_S = Metric("upload", "MiB/s", True)
ADDED_P99 = Metric("p99 added", "ms", False)
IDLE_RSS = Metric("RSS idle conns", "MiB", False)


@dataclass(frozen=True, slots=True)
class Row:
    """One peer in one scenario. `value` is the scenario's main metric; None means no number."""

    peer: str
    value: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    rss_mib: float | None = None
    note: str = ""

    @property
    def measured(self) -> bool:
        return self.value is not None


def not_available(peer: str, reason: str) -> Row:
    return Row(peer, note=f"not available: {reason}")


@dataclass(frozen=True, slots=True)
class Target:
    """A goal from the issue: the project's value against `peer` times `factor`."""

    peer: str
    factor: float


@dataclass(frozen=True)
class ScenarioResult:
    name: str
    load: str
    metric: Metric
    rows: tuple[Row, ...]
    targets: tuple[Target, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def row(self, peer: str) -> Row | None:
        return next((r for r in self.rows if r.peer == peer), None)

    def ratio(self, peer: str) -> float | None:
        """Project value divided by the peer's value on the main metric."""
        return _ratio(self.row(PROJECT), self.row(peer), "value")

    def rss_ratio(self, peer: str) -> float | None:
        return _ratio(self.row(PROJECT), self.row(peer), "rss_mib")

    def target_status(self, target: Target) -> str:
        """Compare values, not the ratio: a latency delta may be zero or negative (noise)."""
        mine, theirs = self.row(PROJECT), self.row(target.peer)
        if mine is None or theirs is None or mine.value is None or theirs.value is None:
            return "unknown"
        goal = target.factor * theirs.value
        met = mine.value >= goal if self.metric.higher_is_better else mine.value <= goal
        return "met" if met else "not met"

    def describe_target(self, target: Target) -> str:
        op = ">=" if self.metric.higher_is_better else "<="
        mine, theirs = self.row(PROJECT), self.row(target.peer)
        ratio = self.ratio(target.peer)
        if mine is None or mine.value is None:
            got = "no project number"
        elif ratio is not None:
            got = f"got {ratio:.2f}x"
        else:
            theirs_value = theirs.value if theirs else None
            got = f"{fmt_value(mine.value)} vs {fmt_value(theirs_value)} {self.metric.unit}"
        return (
            f"{self.name}: {self.metric.name} {op} {target.factor:g}x {target.peer}: "
            f"{self.target_status(target)} ({got})"
        )


def _ratio(mine: Row | None, theirs: Row | None, attr: str) -> float | None:
    if mine is None or theirs is None or mine is theirs:
        return None
    a, b = getattr(mine, attr), getattr(theirs, attr)
    if a is None or b is None or a < 0 or b <= 0:
        return None  # a ratio of deltas around zero (latency noise) means nothing
    return a / b


def measure_rows(
    endpoints: Sequence, measure: Callable, rounds: int = 1
) -> tuple[tuple[Row, ...], list[str]]:
    """Measure every endpoint (anything with `.peer` and `.unavailable`) into a row.

    With rounds > 1 the peers take turns, round after round, and each number is the median over
    the rounds: on a shared machine a burst of someone else's work then hits every peer alike
    instead of ruining one peer's only run.

    An absent peer gets a "not available" row. The project that answers wrongly or whose load run
    fails, in any round, gets a "failed" row and a failure message (the caller records the table
    first, then fails), and is not measured again. A reference peer (direct, Envoy, HAProxy) is
    held to the same check but may lose a minority of its rounds (HAProxy once reset 18 of 208,689
    HTTP/2 streams in one round of five): its row is the median of the good rounds and its note
    says which failed and why. Failing half its rounds or more fails the run as for the project.
    """
    samples: dict[str, list[Row]] = {e.peer: [] for e in endpoints}
    errors: dict[str, list[str]] = {e.peer: [] for e in endpoints}
    for i in range(rounds):
        for endpoint in endpoints:
            peer = endpoint.peer
            if endpoint.unavailable or (peer == PROJECT and errors[peer]):
                continue
            try:
                samples[peer].append(measure(endpoint))
            except Exception as e:  # noqa: BLE001 - every failure must reach the table, then the test
                errors[peer].append(f"round {i + 1}: {e}")
    rows, failures = [], []
    for endpoint in endpoints:
        peer, errs, good = endpoint.peer, errors[endpoint.peer], samples[endpoint.peer]
        if endpoint.unavailable:
            rows.append(not_available(peer, endpoint.unavailable))
        elif errs and (peer == PROJECT or len(errs) * 2 >= len(errs) + len(good)):
            reason = errs[0].split(": ", 1)[1]
            rows.append(Row(peer, note=f"failed: {reason}"))
            failures.append(f"{peer}: {reason}")
        else:
            row = combine_rounds(good)
            if errs:
                lost = f"{len(errs)} of {len(errs) + len(good)} rounds failed ({'; '.join(errs)})"
                row = replace(row, note=f"{row.note}; {lost}" if row.note else lost)
            rows.append(row)
    return order_rows(rows), failures


def combine_rounds(rounds: Sequence[Row]) -> Row:
    """Median value and latencies over rounds, RSS and note of the last round."""
    if len(rounds) == 1:
        return rounds[0]

    def median_of(attr: str) -> float | None:
        values = [getattr(r, attr) for r in rounds if getattr(r, attr) is not None]
        return statistics.median(values) if values else None

    last = rounds[-1]
    spread = " ".join(fmt_value(r.value) for r in rounds)
    note = f"median of {len(rounds)} rounds ({spread})" + (f"; {last.note}" if last.note else "")
    return Row(
        last.peer, median_of("value"), median_of("p50_ms"), median_of("p99_ms"), last.rss_mib, note
    )


def order_rows(rows: Iterable[Row]) -> tuple[Row, ...]:
    rank = {peer: i for i, peer in enumerate(PEER_ORDER)}
    return tuple(sorted(rows, key=lambda r: rank.get(r.peer, len(rank))))


def fmt_value(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit in ("req/s", "403/s") or abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


HEADER = (
    "scenario",
    "peer",
    "metric",
    "value",
    "p50 ms",
    "p99 ms",
    "RSS MiB",
    f"{PROJECT} / peer",
    "RSS ratio",
    "note",
)


def table_rows(results: Sequence[ScenarioResult]) -> list[tuple[str, ...]]:
    """The cells of the one table: every scenario, every peer, ratios of the project to it."""
    out = []
    for res in results:
        for row in res.rows:
            out.append(
                (
                    res.name,
                    row.peer,
                    res.metric.unit,
                    fmt_value(row.value, res.metric.unit),
                    fmt_value(row.p50_ms),
                    fmt_value(row.p99_ms),
                    fmt_value(row.rss_mib),
                    fmt_ratio(res.ratio(row.peer)),
                    fmt_ratio(res.rss_ratio(row.peer)),
                    row.note,
                )
            )
    return out


def render_text(results: Sequence[ScenarioResult]) -> str:
    cells = [HEADER, *table_rows(results)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER) - 1)]
    lines = []
    for i, c in enumerate(cells):
        left = "  ".join(
            c[j].ljust(widths[j]) if j < 3 else c[j].rjust(widths[j]) for j in range(len(widths))
        )
        lines.append(f"{left}  {c[-1]}".rstrip())
        if i == 0:
            lines.append("-" * len(lines[0]))
    lines.extend(_footer(results))
    return "\n".join(lines)


def render_markdown(results: Sequence[ScenarioResult]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in table_rows(results)]
    footer = _footer(results)
    if footer:
        lines.append("")
        lines += [f"- {line.lstrip('- ')}" for line in footer]
    return "\n".join(lines)


def _footer(results: Sequence[ScenarioResult]) -> list[str]:
    lines = []
    for res in results:
        lines.append(f"- {res.name}: {res.load}")
        lines += [f"  - {note}" for note in res.notes]
    targets = [res.describe_target(t) for res in results for t in res.targets]
    if targets:
        lines.append("- targets from the issues:")
        lines += [f"  - {t}" for t in targets]
    return lines


def to_json(results: Sequence[ScenarioResult], meta: dict | None = None) -> dict:
    scenarios = []
    for res in results:
        scenarios.append(
            {
                "name": res.name,
                "load": res.load,
                "metric": asdict(res.metric),
                "rows": [asdict(r) for r in res.rows],
                "ratios": {r.peer: res.ratio(r.peer) for r in res.rows if r.peer != PROJECT},
                "rss_ratios": {
                    r.peer: res.rss_ratio(r.peer) for r in res.rows if r.peer != PROJECT
                },
                "targets": [
                    {**asdict(t), "status": res.target_status(t), "text": res.describe_target(t)}
                    for t in res.targets
                ],
                "notes": list(res.notes),
            }
        )
    return {"meta": meta or {}, "scenarios": scenarios}


def run_meta() -> dict:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "note": "a shared 2-core machine; other work ran at the same time, numbers are noisy",
    }


def write_results(
    results: Sequence[ScenarioResult], directory: Path, meta: dict | None = None
) -> tuple[Path, Path]:
    """Write `bench-<time>.json/.md` and copies as `latest.json/.md`; returns the timed paths."""
    directory.mkdir(parents=True, exist_ok=True)
    meta = meta if meta is not None else run_meta()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    doc = json.dumps(to_json(results, meta), indent=2)
    md = f"# l7proxy benchmark {meta.get('time', stamp)}\n\n{meta.get('note', '')}\n\n"
    md += render_markdown(results) + "\n"
    json_path, md_path = directory / f"bench-{stamp}.json", directory / f"bench-{stamp}.md"
    for path, text in ((json_path, doc), (md_path, md)):
        path.write_text(text)
        (directory / f"latest{path.suffix}").write_text(text)
    return json_path, md_path
