"""After the checks, the agent's dependency map for a person to look at.

The map is served by the agent, so it lives only as long as the agent does. From a terminal the
demo keeps the agent up until Enter (or Ctrl-C); with DEMO_WAIT=SECONDS for that long. Otherwise
(CI, tests, a pipe on stdin) it tears down at once and prints no link, as it would be dead.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request

from l7proxy.depmap.hold import wait_plan


def answers(url: str) -> bool:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # it is on loopback
    try:
        with direct.open(url, timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def keep_up(url: str | None, stdin=sys.stdin, env=os.environ, out=sys.stdout) -> None:
    """Hold the caller (which keeps the agent) while a person looks at the map at `url`."""

    def say(text: str) -> None:
        print(f"\n{text}", file=out, flush=True)

    plan = wait_plan(stdin.isatty(), env)
    if plan == 0:
        why = "DEMO_WAIT=0" if env.get("DEMO_WAIT", "").strip() else "stdin is not a terminal"
        say(f"The dependency map goes down with the agent now ({why}); run `make demo` in a "
            "terminal to look at it.")  # fmt: skip
        return
    if url is None or not answers(url):
        say("The agent's dependency map does not answer; not waiting.")
        return
    try:
        if plan is None:
            say(f"Map live at {url} - press Enter (or Ctrl-C) to tear down")
            stdin.readline()
        else:
            say(f"Map live at {url} for {plan:g} s (DEMO_WAIT), then torn down")
            time.sleep(plan)
    except KeyboardInterrupt:
        pass  # Ctrl-C here is the way out, not an interruption of the demo
