"""Keep the map up for a person to look at (`make demo`), or not, as issue 9 asks.

With a terminal on stdin: until Enter. Otherwise no wait, unless DEMO_WAIT=SECONDS asks for one.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time


def wait_plan(stdin_is_tty: bool, env) -> float | None:
    """None = wait for Enter; otherwise the seconds to wait (0 = none)."""
    raw = env.get("DEMO_WAIT", "").strip()
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            pass
    return None if stdin_is_tty else 0.0


def announce(url: str, plan: float | None, out=sys.stdout) -> None:
    print(f"Service dependency map: {url}", file=out)
    if plan is None:
        print("Open it in a browser; press Enter to stop.", file=out)
    elif plan:
        print(f"Keeping it up for {plan:g} s (DEMO_WAIT).", file=out)
    out.flush()


def hold(url: str, stdin=sys.stdin, env=os.environ, out=sys.stdout) -> None:
    """Blocking form, for a demo whose gateway runs in another process."""
    plan = wait_plan(stdin.isatty(), env)
    announce(url, plan, out)
    if plan is None:
        stdin.readline()
    elif plan:
        time.sleep(plan)


async def hold_async(url: str, stdin=sys.stdin, env=os.environ, out=sys.stdout) -> None:
    """Same, without blocking the event loop that serves the map."""
    plan = wait_plan(stdin.isatty(), env)
    announce(url, plan, out)
    if plan is None:
        await asyncio.get_running_loop().run_in_executor(None, stdin.readline)
    elif plan:
        await asyncio.sleep(plan)
