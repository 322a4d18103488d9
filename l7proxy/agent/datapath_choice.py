"""Which kernel datapath the agent runs: the BPF adapter (`bpf_adapter.py`), or none.

`NullDatapath` is what runs when BPF is off (`--no-bpf`, no root, no bcc): the agent still owns
endpoints, identities and policy, and says plainly in `status` that nothing is enforced in the
kernel. The BPF adapter puts `redirect_bpf`'s API behind the same calls.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


class NullDatapath:
    name = "disabled"

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def start(self, emit: Callable[[dict], None]) -> None:
        pass

    def endpoint_added(
        self, name: str, host_if: str, ip: str, identity: int, ip6: str = ""
    ) -> None:
        pass

    def endpoint_removed(self, name: str, host_if: str, ip: str, ip6: str = "") -> None:
        pass

    def apply(self, compiled, ipcache_entries: dict[str, int], proxy_ports: dict[int, int]) -> None:
        pass

    def ipcache_upsert(self, cidr: str, identity: int) -> None:
        pass

    def status(self) -> dict:
        return {"state": "disabled", "detail": self.reason}

    def counters(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def bpf_problem() -> str | None:
    """Why BPF cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root"
    if not Path("/sys/fs/bpf").is_dir():
        return "no /sys/fs/bpf (kernel without BPF filesystem)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc is not importable (run make setup)"
    return None


def make_datapath(enabled: bool, pin_dir: str | None, host_routing: str = "bpf"):
    if not enabled:
        return NullDatapath("BPF turned off (--no-bpf)")
    problem = bpf_problem()
    if problem:
        return NullDatapath(problem)
    try:
        from l7proxy.agent.bpf_adapter import BpfDatapath
    except ImportError as exc:
        return NullDatapath(f"the BPF datapath is not available: {exc}")
    return BpfDatapath(pin_dir, host_routing)
