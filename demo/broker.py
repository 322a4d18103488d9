"""The empire's Kafka broker: noida-db, its data directory, and orphans of killed runs.

Data directories are named `l7proxy-demo-kafka-<run prefix>...`, so a run (and its test) can tell
its own broker from others'.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from pathlib import Path

DATA_DIR_PREFIX = "l7proxy-demo-kafka-"


def binary() -> str:
    """The broker binary itself. The `noida-db` console script is a Python wrapper that runs it
    with subprocess.call and does not pass signals on: stopping the wrapper left the broker
    running (orphans with /tmp/l7proxy-demo-kafka-* data dirs piled up across demo runs)."""
    with contextlib.suppress(ImportError):
        from importlib.resources import files

        found = Path(str(files("noida_db").joinpath("noida-db")))
        if found.is_file():
            return str(found)
    raise RuntimeError("noida-db is not installed (make setup installs it)")


def data_dir(tag: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{DATA_DIR_PREFIX}{tag}"))


def remove(data: Path) -> None:
    shutil.rmtree(data, ignore_errors=True)


def argv(data: Path, port: int, host: str | None = None) -> list[str]:
    """Kafka only, on host:port (noida-db's default host when None)."""
    return [
        binary(),
        "start",
        "--only",
        "kafka",
        *(["--host", host] if host else []),
        "--kafka-port",
        str(port),
        "--data-dir",
        str(data),
    ]


def shown(argv: list[str]) -> list[str]:
    """argv as the demo prints it: `noida-db` for the binary's full path."""
    return ["noida-db" if a.endswith("/noida-db") else a for a in argv]


def is_demo(cmdline: bytes) -> bool:
    """The command line (NUL-separated, as /proc has it) of a running demo: `python -m demo ...`."""
    args = cmdline.split(b"\0")
    return any(a == b"-m" and b == b"demo" for a, b in zip(args, args[1:], strict=False))


def sweep(tag: str) -> list[int]:
    """Stop orphaned brokers of earlier runs with this prefix (their demo is gone: a demo killed
    with SIGKILL cannot stop its broker, which init or a subreaper then adopts); a broker whose
    parent is a running demo is left alone. Returns the pids stopped."""
    mark = f"{DATA_DIR_PREFIX}{tag}".encode()
    stopped = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
            if b"noida-db" not in cmdline or mark not in cmdline:
                continue
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            parent = Path(f"/proc/{ppid}/cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            parent = b""
        if not is_demo(parent):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(proc.name), signal.SIGKILL)
                stopped.append(int(proc.name))
    return stopped
