"""Flip a running agent's datapath switches in its pinned config map (as `--host-routing`
would at start), for tests and benches that compare both modes on one agent."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def host_routing(pin_dir: Path, on: bool) -> Iterator[None]:
    """BPF host routing on or off for a while; the previous setting afterwards."""
    from redirect_bpf import structs
    from redirect_bpf.datapath import switch_config_flag
    from redirect_bpf.maps import open_pinned_maps, release

    maps = open_pinned_maps(pin_dir, {"config": structs.MAPS["config"]})
    try:
        before = switch_config_flag(maps["config"], structs.CFG_HOST_ROUTING, on)
        try:
            yield
        finally:
            switch_config_flag(maps["config"], structs.CFG_HOST_ROUTING, before)
    finally:
        release(maps, (), None)
