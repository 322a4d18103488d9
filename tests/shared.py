"""Where the read-only ../shared material (Cilium's example policies) lives, if present."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _find_shared() -> Path:
    candidates = [os.environ.get("L7PROXY_SHARED"), REPO.parent / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and Path(candidate, "conformance").is_dir():
            return Path(candidate)
    return REPO.parent / "shared"


SHARED = _find_shared()
CILIUM_EXAMPLES = SHARED / "conformance" / "cilium-examples"
