"""A podman container's labels, read from podman's own state file while the runtime waits for ADD.

Podman 4 (CNI backend) gives a plugin the container's name (K8S_POD_NAME) but not its labels, and
asking podman (`podman inspect`) from inside ADD deadlocks: `podman run` holds the container's lock
until the network is up (checked: the inspect waited until its timeout). The labels are in the
container's configuration, which podman stored as one JSON document (`{"spec": ..., "id": ...,
"labels": {...}}`) in its BoltDB state file before it set up the network. BoltDB keeps a value's
bytes contiguous, so the plugin finds the document by the container's id and decodes it; it never
writes the file. A document that does not decode or names another id is skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_STATE = "/var/lib/containers/storage/libpod/bolt_state.db"
MAX_DOCUMENT = 4 * 1024 * 1024  # a container config with a full OCI spec is a few KiB


def podman_labels(state_files, container_id: str) -> dict[str, str]:
    """The labels of `container_id` from the first state file that has it; {} if none does."""
    needle = f'"id":"{container_id}"'.encode()
    for path in state_files or [DEFAULT_STATE]:
        try:
            data = Path(path).read_bytes()
        except OSError:
            continue
        found = _find(data, needle, container_id)
        if found is not None:
            return found
    return {}


def _find(data: bytes, needle: bytes, container_id: str) -> dict[str, str] | None:
    decoder = json.JSONDecoder()
    at = data.find(needle)
    while at >= 0:
        start = data.rfind(b'{"spec":', 0, at)
        if start >= 0:
            text = data[start : start + MAX_DOCUMENT].decode("utf-8", "replace")
            try:
                doc, _ = decoder.raw_decode(text)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and doc.get("id") == container_id:
                labels = doc.get("labels") or {}
                return {str(k): str(v) for k, v in labels.items()}
        at = data.find(needle, at + 1)
    return None
