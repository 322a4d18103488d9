"""h2spec (HTTP/2 conformance, 146 cases) against `l7proxy gateway --protocol http2` in front of
nginx serving h2c: every case passes (issue 19). `make setup` builds h2spec into the venv
(scripts/setup.sh); with CI=true a missing h2spec fails this test instead of skipping it."""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import IN_CI, need_binary
from tests.e2e.peers import Gateway, free_port, policy_yaml
from tests.e2e.test_http2 import NginxH2

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

H2SPEC_CASES = 146


def h2spec_binary() -> str:
    """The h2spec that `make setup` built next to this Python, else one on PATH."""
    built = Path(sys.executable).parent / "h2spec"
    if built.exists():
        return str(built)
    if IN_CI:
        pytest.fail(f"h2spec is not built ({built}): make setup builds it")
    return need_binary("h2spec")


def junit_results(path: Path) -> list[tuple[str, str]]:
    """[("<section> <case>", "passed" | "failed" | "skipped")] from h2spec's JUnit report."""
    out = []
    for suite in ET.parse(path).getroot().iter("testsuite"):
        for case in suite.iter("testcase"):
            name = f"{case.get('package')} {case.get('classname')}"
            if case.find("failure") is not None or case.find("error") is not None:
                out.append((name, "failed"))
            elif case.find("skipped") is not None:
                out.append((name, "skipped"))
            else:
                out.append((name, "passed"))
    return out


# Case 6.9.1/3 opens a stream without END_STREAM and overflows its window with two WINDOW_UPDATEs.
# nginx answers /public/upload at once and resets the unread request (NO_ERROR); when that reaches
# the client before the proxy has read the two frames, the stream is closed and a closed stream
# ignores WINDOW_UPDATE (RFC 9113 5.1), so the case's RST_STREAM FLOW_CONTROL_ERROR never comes
# (about 1 run in 50 under load). /public/after-body answers only after the whole request (nginx
# reads a proxied body first), which keeps the stream open, so the case is decided there, every
# time; the rest of the suite needs /public/upload (nginx's proxy refuses request trailers).
RACING_CASE = "http2/6.9.1 Sends multiple WINDOW_UPDATE frames increasing the flow control window to above 2^31-1 on a stream"
CLOSED_FIRST = "RST_STREAM Frame (length:4, flags:0x00, stream_id:1)"


def run_h2spec(h2spec: str, port: int, path: str, report: Path, *cases: str):
    return subprocess.run(
        [h2spec, "-h", "127.0.0.1", "-p", str(port), "-P", path, "-o", "3", "-j", str(report), *cases],
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def failures(report: Path) -> dict[str, str]:
    """{"<section> <case>": what h2spec expected and saw} for each case that did not pass."""
    out = {}
    for suite in ET.parse(report).getroot().iter("testsuite"):
        for case in suite.iter("testcase"):
            bad = case.find("failure")
            bad = case.find("error") if bad is None else bad
            if bad is not None:
                out[f"{case.get('package')} {case.get('classname')}"] = (
                    bad.text or bad.get("message") or "?"
                )
    return out


def test_h2spec_passes_every_case_through_the_gateway(tmp_path):
    h2spec = h2spec_binary()
    nginx = NginxH2(need_binary("nginx"))
    port = free_port()
    policy = tmp_path / "policy.yaml"
    # h2spec sends GET and POST (with bodies) to one path: both are allowed there, so its
    # streams go through the relay to nginx rather than being answered by the proxy.
    rules = '- method: GET\n          path: "/public/.*"\n        - method: POST\n          path: "/public/.*"'
    policy.write_text(policy_yaml(port, rules))
    gw = Gateway(
        ["--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{nginx.port}",
         "--policy", str(policy), "--labels", "app=web", "--protocol", "http2"]
    )  # fmt: skip
    report = tmp_path / "h2spec.xml"
    racing = tmp_path / "h2spec-6.9.1.xml"
    try:
        run = run_h2spec(h2spec, port, "/public/upload", report)
        decided = [
            run_h2spec(h2spec, port, "/public/after-body", racing, "http2/6.9.1") for _ in range(3)
        ]
        gateway_alive = gw.proc.poll() is None
    finally:
        gw.stop()
        nginx.stop()
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
    assert report.exists(), f"h2spec wrote no report (exit {run.returncode}): {summary}"
    results = junit_results(report)
    assert len(results) == H2SPEC_CASES, summary
    assert not [name for name, result in results if result == "skipped"], summary
    failed = failures(report)
    raced = failed.pop(RACING_CASE, None)
    assert not failed, f"{summary}\nnot passed:\n" + "\n".join(
        f"{k}: {v}" for k, v in failed.items()
    )
    assert raced is None or CLOSED_FIRST in raced, raced
    for again in decided:
        assert again.returncode == 0 and "3 tests, 3 passed, 0 skipped, 0 failed" in again.stdout, (
            again.stdout
        )
    assert gateway_alive
