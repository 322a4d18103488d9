"""Flip a running agent's datapath switches in its pinned config map (as `--host-routing`
would at start), for tests and benches that compare both modes on one agent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def host_routing(pin_dir: Path, on: bool) -> Iterator[None]:
    """BPF host routing on or off for a while; the previous setting afterwards."""
    from redirect_bpf import bpfsys, structs
    from redirect_bpf.maps import BpfMap

    key_type, value_type, percpu = structs.MAPS["config"]
    config = BpfMap("config", bpfsys.obj_get(pin_dir / "map_config"), key_type, value_type, percpu)
    try:
        cfg = config.get(key_type(0))
        before = cfg.flags & structs.CFG_HOST_ROUTING
        cfg.flags = (cfg.flags & ~structs.CFG_HOST_ROUTING) | (
            structs.CFG_HOST_ROUTING if on else 0
        )
        config.put(key_type(0), cfg)
        try:
            yield
        finally:
            cfg = config.get(key_type(0))
            cfg.flags = (cfg.flags & ~structs.CFG_HOST_ROUTING) | before
            config.put(key_type(0), cfg)
    finally:
        config.close()
