"""The atheris driver: `python -m tests.fuzz.run TARGET [--runs N] [libFuzzer flags...]`.

Instruments parsers/, policies/ and l7proxy/ for coverage, starts from the committed seeds
(tests/fuzz/corpus/TARGET) plus what earlier runs found interesting (a working corpus under
$FUZZ_WORK, default /tmp/l7fuzz), and runs every input through budget.check. A finding (an
undeclared exception, an input over its CPU or allocation budget, or libFuzzer's own crash,
timeout or out-of-memory; a budget finding is confirmed without instrumentation first,
recheck.py) is written by libFuzzer to tests/fuzz/regressions/TARGET/ and the run
exits non-zero; `make test` then replays it for good. Inputs are at most budget.MAX_INPUT bytes.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import atheris

from tests.fuzz import budget
from tests.fuzz.seeds import CORPUS, REGRESSIONS

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target")
    parser.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", 1_000_000)))
    args, extra = parser.parse_known_args()

    with atheris.instrument_imports(include=["parsers", "policies", "l7proxy"]):
        import l7proxy.kafka.layer  # noqa: F401
        import parsers.dns  # noqa: F401
        import parsers.http1  # noqa: F401
        import parsers.http2  # noqa: F401
        import policies  # noqa: F401
    from tests.fuzz.targets import TARGETS

    target = TARGETS[args.target]
    work = Path(os.environ.get("FUZZ_WORK", "/tmp/l7fuzz")) / args.target
    work.mkdir(parents=True, exist_ok=True)
    findings = REGRESSIONS / args.target
    findings.mkdir(parents=True, exist_ok=True)
    count = [0]

    def one_input(data: bytes) -> None:
        count[0] += 1
        finding = budget.check(target, data, sample=count[0] % budget.SAMPLE_EVERY == 0)
        if finding is not None and finding.kind != "exception":
            finding = _recheck(args.target, data, finding)
        if finding is not None:
            raise FuzzFinding(str(finding))

    argv = [sys.argv[0], *extra, f"-runs={args.runs}", f"-max_len={budget.MAX_INPUT}",
            "-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1",
            f"-artifact_prefix={findings}/", str(work), str(CORPUS / args.target)]  # fmt: skip
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def _recheck(target: str, data: bytes, finding: budget.Finding) -> budget.Finding | None:
    """A budget finding holds only if it holds without instrumentation (recheck.py)."""
    done = subprocess.run([sys.executable, "-m", "tests.fuzz.recheck", target], input=data,
                          capture_output=True, cwd=REPO, timeout=600)  # fmt: skip
    if done.returncode == 0:
        print(f"recheck: not over budget without instrumentation ({finding})", file=sys.stderr)
        return None
    detail = done.stdout.decode(errors="replace").strip() or done.stderr.decode(errors="replace")
    return budget.Finding(finding.kind, f"{detail} (without instrumentation)")


class FuzzFinding(Exception):
    """One input broke a check of budget.py (libFuzzer saves it as crash-<sha1>)."""


if __name__ == "__main__":
    main()
