"""`l7proxy cni install`: the plugin executable in a CNI bin dir and a network list in a conf dir.

The executable is a short shell script: it answers VERSION itself and otherwise starts this
interpreter isolated (`-I`: no PYTHONPATH, no user site; `-S`: no site-packages, the plugin needs
only the standard library) with this checkout or installation first on the path, so the plugin runs
the same code as the agent whatever environment the runtime passes. The network list (CNI 1.0.0)
names the agent's socket and, for podman, where its state file is (labels, see podman_state.py);
`chain` appends standard plugins (portmap, bandwidth) after ours.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import l7proxy
from l7proxy.cni.plugin import SUPPORTED_VERSIONS
from l7proxy.cni.podman_state import DEFAULT_STATE

PLUGIN_NAME = "l7proxy-cni"
CHAINABLE = {
    "portmap": {"type": "portmap", "capabilities": {"portMappings": True}},
    "bandwidth": {"type": "bandwidth", "capabilities": {"bandwidth": True}},
}


def launcher() -> str:
    root = str(Path(l7proxy.__file__).resolve().parent.parent)
    code = (
        f"import sys; sys.path.insert(0, {root!r}); "
        "from l7proxy.cni.plugin import main; sys.exit(main())"
    )
    version = json.dumps({"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)})
    # Runtimes ask VERSION before every ADD: the shell answers it without starting Python (~45 ms).
    return (
        "#!/bin/sh\n# written by `l7proxy cni install`\n"
        f'if [ "$CNI_COMMAND" = VERSION ]; then echo {shlex.quote(version)}; exit 0; fi\n'
        f"exec {shlex.quote(sys.executable)} -I -S -c {shlex.quote(code)}\n"
    )


def network_list(
    name: str,
    socket: str,
    runtime: str = "podman",
    podman_state: str = DEFAULT_STATE,
    chain: tuple[str, ...] = (),
    labels: dict[str, str] | None = None,
) -> dict:
    ours = {"type": PLUGIN_NAME, "agentSocket": socket, "runtime": runtime}
    if runtime == "podman":
        ours["podmanState"] = [podman_state]
    if labels:
        ours["labels"] = dict(labels)
    for extra in chain:
        if extra not in CHAINABLE:
            raise ValueError(f"cannot chain {extra!r}: choose from {', '.join(CHAINABLE)}")
    return {
        "cniVersion": "1.0.0",
        "name": name,
        "plugins": [ours, *(CHAINABLE[c] for c in chain)],
    }


def install(bin_dir: Path, conf_dir: Path, netlist: dict) -> tuple[Path, Path]:
    """Write both files atomically (a runtime may read them at any moment); returns their paths."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    conf_dir.mkdir(parents=True, exist_ok=True)
    plugin = bin_dir / PLUGIN_NAME
    _write(plugin, launcher(), 0o755)
    conf = conf_dir / f"50-{netlist['name']}.conflist"
    _write(conf, json.dumps(netlist, indent=2) + "\n", 0o644)
    return plugin, conf


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
