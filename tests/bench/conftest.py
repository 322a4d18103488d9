"""Fixtures of the benchmarks: one nginx backend per run, fresh peers per scenario, one report.

Every bench test carries the `bench` marker, so `make test` never runs them; `make bench` does.
Each scenario prints its own rows at once; the one table of the whole run is printed at the end and
written as JSON and Markdown under tests/bench/results/.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.bench import harness, peers
from tests.conftest import need_binary

RESULTS_DIR = Path(__file__).with_name("results")
_RESULTS: list[harness.ScenarioResult] = []


def bench_duration() -> float:
    """Seconds of load per peer (BENCH_DURATION, default 10 as in the issues)."""
    return float(os.environ.get("BENCH_DURATION", "10"))


@pytest.fixture(scope="session")
def duration() -> float:
    return bench_duration()


@pytest.fixture(scope="session")
def rounds() -> int:
    """Throughput scenarios split the load into rounds the peers take in turn (BENCH_ROUNDS, 5:
    with the default 10 s, 5 rounds of 2 s per peer; on 2 shared cores single rounds swing by
    ±15 % with where the scheduler puts the proxy, nginx and wrk, so the median of 5 is steadier
    than the median of 3 for the same load)."""
    return max(1, int(os.environ.get("BENCH_ROUNDS", "5")))


@pytest.fixture(scope="session")
def round_seconds(duration, rounds) -> float:
    """Seconds of load per peer and round: the duration split over the rounds, whole seconds (as
    wrk and h2load take them), at least 2."""
    return float(max(2, round(duration / rounds)))


@pytest.fixture(scope="session")
def nofile() -> int:
    return peers.raise_nofile()


@pytest.fixture(scope="session")
def nginx(nofile):
    """The nginx backend of the whole run (`peers.Nginx`).

    Its directory sits right under /tmp (mode 0755): nginx workers run unprivileged and must be able
    to reach the static files, which pytest's private tmp dirs do not allow.
    """
    for tool in ("nginx", "wrk", "h2load", "curl"):
        need_binary(tool)
    directory = Path(tempfile.mkdtemp(prefix="l7proxy-bench-nginx-"))
    backend = peers.start_nginx(directory)
    yield backend
    backend.proc.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def workdir(tmp_path) -> Path:
    """Generated configs and logs of one scenario's peers."""
    return tmp_path


@pytest.fixture
def record():
    """Record a scenario: print its rows now; the run's table is printed and written at the end."""

    def _record(result: harness.ScenarioResult) -> None:
        _RESULTS.append(result)
        print(f"\n{harness.render_text([result])}\n", flush=True)

    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    json_path, md_path = harness.write_results(_RESULTS, RESULTS_DIR)
    terminalreporter.section("l7proxy benchmark: the project against direct, Envoy and HAProxy")
    for line in harness.render_text(_RESULTS).splitlines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"written: {json_path} and {md_path} (also latest.json/.md)")
