"""Re-check one input without coverage instrumentation: `python -m tests.fuzz.recheck TARGET`
with the input on stdin; exit status 3 and the finding on stdout if it breaks a budget.

atheris' instrumentation makes Python code two to three times slower, so an input over the CPU
budget in the fuzzing process is a finding only if it is over budget here too, where it runs as
in the product (and as test_replay runs it).
"""

from __future__ import annotations

import sys

from tests.fuzz.budget import check, confirm_memory, confirm_time
from tests.fuzz.targets import TARGETS


def main() -> int:
    target = TARGETS[sys.argv[1]]
    data = sys.stdin.buffer.read()
    finding = check(target, data) or confirm_time(target, data) or confirm_memory(target, data)
    if finding is None:
        return 0
    print(finding)
    return 3


if __name__ == "__main__":
    sys.exit(main())
