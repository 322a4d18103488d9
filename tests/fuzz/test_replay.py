"""Every corpus entry and every saved finding through the fuzz checks, without atheris: no
undeclared exception, and within the CPU and allocation budgets of budget.py. A finding of the
fuzzer is kept in tests/fuzz/regressions/<target>/ and stays here as a regression test."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.budget import check, confirm_memory, confirm_time
from tests.fuzz.seeds import CORPUS, REGRESSIONS
from tests.fuzz.targets import TARGETS


def _entries() -> list:
    out = []
    for folder in (CORPUS, REGRESSIONS):
        for target in sorted(TARGETS):
            for path in sorted((folder / target).glob("*")):
                if path.is_file() and not path.name.startswith("."):
                    out.append(pytest.param(target, path, id=f"{folder.name}/{target}/{path.name}"))
    return out


ENTRIES = _entries()


def test_every_target_has_seeds_and_the_issue_regression_is_kept():
    for target in TARGETS:
        assert any((CORPUS / target).glob("seed-*")), target
    assert (REGRESSIONS / "kafka" / "issue19-produce-topic-count").is_file()


@pytest.mark.parametrize(("target", "path"), ENTRIES)
def test_replay(target: str, path: Path):
    data = path.read_bytes()
    entry = TARGETS[target]
    finding = check(entry, data)
    if finding is None and path.parent.parent == REGRESSIONS:
        # A saved finding is re-checked in full, not only when its first run looks suspect.
        finding = confirm_time(entry, data) or confirm_memory(entry, data)
    assert finding is None, f"{path}: {finding}"
