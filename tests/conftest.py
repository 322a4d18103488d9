"""Shared test policy: root/BPF tests run in CI and fail there rather than skip."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parent.parent
from tests.shared import SHARED  # noqa: E402, F401


def _bpf_problem() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not Path("/sys/fs/bpf").is_dir():
        return "no /sys/fs/bpf in this kernel"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (run make setup)"
    return None


def _kernel_problem(item) -> str | None:
    if "bpf" in item.keywords:
        return _bpf_problem()
    if "root" in item.keywords and os.geteuid() != 0:
        return "needs root"
    return None


def pytest_collection_modifyitems(config, items):
    fuzz_on = os.environ.get("L7PROXY_FUZZ") == "1"
    for item in items:
        if item.get_closest_marker("fuzz") is not None and not fuzz_on:
            item.add_marker(pytest.mark.skip(reason="fuzzing is off by default (L7PROXY_FUZZ=1)"))
        problem = _kernel_problem(item)
        if problem and not IN_CI:
            item.add_marker(pytest.mark.skip(reason=f"{problem} (runs in CI with CI=true)"))


@pytest.fixture(autouse=True)
def _kernel_tests_fail_in_ci(request):
    """With CI=true a root/BPF test that cannot run is a failure, never a skip."""
    problem = _kernel_problem(request.node)
    if problem and IN_CI:
        pytest.fail(f"CI=true and this kernel test cannot run: {problem}")


def need_binary(name: str) -> str:
    """Path of a peer binary; missing peers fail in CI and skip elsewhere."""
    path = shutil.which(name) or (
        f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None
    )
    if path:
        return path
    if IN_CI:
        pytest.fail(f"{name} is not installed (make setup installs it)")
    pytest.skip(f"{name} is not installed (run make setup)")
