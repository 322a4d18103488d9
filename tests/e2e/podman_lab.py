"""Test helper: real podman containers on the l7proxy CNI network, with no image registry.

A busybox rootfs (Debian's busybox-static) is built once per test session under a temporary
directory and run with `podman run --rootfs`. Podman gets its own storage root, run root and a
containers.conf that picks the CNI backend with this lab's plugin and network directories, so
the tests neither depend on nor disturb the host's podman or /etc/cni. `close()` removes every
container the lab started (which runs each plugin's DEL) and the directories.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

from l7proxy.cni.install import CHAINABLE, install, network_list

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "httpd", "sleep", "nc", "printf", "cat", "ip")
LANDING_CGI = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\nShip landed\\n'\n"
SYSTEM_PLUGINS = "/usr/lib/cni"  # Debian's containernetworking-plugins (portmap, bandwidth...)
PODMAN_TIMEOUT = 60


def build_rootfs(root: Path) -> Path:
    """bin/busybox with its applets, and /www for `httpd` (a static page and a landing CGI)."""
    if (root / "bin" / "busybox").exists():
        return root
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    (root / "www" / "cgi-bin").mkdir(parents=True)
    (root / "www" / "index.html").write_text("deathstar\n")
    cgi = root / "www" / "cgi-bin" / "request-landing"
    cgi.write_text(LANDING_CGI)
    cgi.chmod(0o755)
    return root


class PodmanLab:
    def __init__(self, base: Path, rootfs: Path, agent_socket: str, chain=("portmap",)) -> None:
        self.base = base
        self.rootfs = rootfs
        self.network = f"l7t{uuid.uuid4().hex[:6]}"
        self.tag = self.network  # every container carries the label l7lab=<tag>
        self.bin_dir, self.conf_dir = base / "cni-bin", base / "net.d"
        self.storage, self.runroot = base / "storage", base / "run"
        netlist = network_list(
            self.network,
            agent_socket,
            podman_state=str(self.storage / "libpod" / "bolt_state.db"),
            chain=tuple(chain),
        )
        for plugin in netlist["plugins"]:
            if plugin["type"] == "bandwidth":  # static limits: podman run has no flag for them
                plugin.update(ingressRate=800_000_000, ingressBurst=8_000_000)
        self.plugin, self.conflist = install(self.bin_dir, self.conf_dir, netlist)
        self.conf = base / "containers.conf"
        self.conf.write_text(
            "[network]\n"
            'network_backend = "cni"\n'
            f'cni_plugin_dirs = ["{self.bin_dir}", "{SYSTEM_PLUGINS}"]\n'
            f'network_config_dir = "{self.conf_dir}"\n'
        )
        assert set(CHAINABLE) >= set(chain)

    def podman(self, *args: str, check: bool = True, timeout: float = PODMAN_TIMEOUT):
        cmd = [
            "podman", "--root", str(self.storage), "--runroot", str(self.runroot),
            "--runtime", "runc", "--events-backend", "file", *args,
        ]  # fmt: skip
        r = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "CONTAINERS_CONF": str(self.conf)},
        )
        if check and r.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r

    def run(self, name: str, labels: dict[str, str], *cmd: str, ports: tuple[str, ...] = ()):
        """Start a detached container on the lab's network; returns its full id."""
        flags = [f"--label={k}={v}" for k, v in labels.items()]
        r = self.podman(
            "run", "-d", "--name", name, "--network", self.network, "--label", f"l7lab={self.tag}",
            "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
            *flags, *(f"--publish={p}" for p in ports), "--rootfs", str(self.rootfs), *cmd,
        )  # fmt: skip
        return r.stdout.strip().splitlines()[-1]

    def rm(self, name: str) -> None:
        self.podman("rm", "-f", "-t", "0", name)

    def close(self) -> None:
        r = self.podman("ps", "-aq", "--filter", f"label=l7lab={self.tag}", check=False)
        for cid in r.stdout.split():
            self.podman("rm", "-f", "-t", "0", cid, check=False)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PodmanLab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_plugin(plugin: Path, command: str, conf: dict, **env: str) -> tuple[int, dict]:
    """Run the installed plugin as a runtime does: CNI_* in the environment, config on stdin."""
    full = {"CNI_COMMAND": command, "CNI_PATH": str(plugin.parent), "PATH": os.environ["PATH"]}
    full.update({f"CNI_{k.upper()}": v for k, v in env.items()})
    r = subprocess.run(
        [str(plugin)], input=json.dumps(conf), capture_output=True, text=True, env=full, timeout=30
    )
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {}
