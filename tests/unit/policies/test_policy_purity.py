"""policies/ does no I/O (issue 14): no file, clock, process or network modules, no open()."""

from __future__ import annotations

import ast
from pathlib import Path

POLICIES = Path(__file__).resolve().parents[3] / "policies"
IO_MODULES = {
    "asyncio",
    "glob",
    "io",
    "os",
    "pathlib",
    "shutil",
    "socket",
    "subprocess",
    "sys",
    "tempfile",
    "time",
}


def test_policies_import_no_io_module_and_call_no_open():
    found = []
    for path in sorted(POLICIES.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "open"
            ):
                found.append(f"{path.name}:{node.lineno}: open()")
            found += [
                f"{path.name}:{node.lineno}: import {n}"
                for n in names
                if n.split(".")[0] in IO_MODULES
            ]
    assert not found, found


def test_load_paths_reads_files_at_the_edge(tmp_path):
    from l7proxy.policy_files import load_paths

    good = tmp_path / "d" / "p.yaml"
    good.parent.mkdir()
    good.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: a}\n"
        "spec: {endpointSelector: {}}\n"
    )
    (tmp_path / "d" / "notes.txt").write_text("not a policy")
    latin1 = tmp_path / "l.yaml"
    latin1.write_bytes(b"name: \xe9\n")
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(5 * 1024 * 1024)
    result = load_paths([tmp_path / "d", latin1, huge, tmp_path / "missing.yaml"])
    assert len(result.rules) == 1
    assert sorted(result.files) == sorted(
        str(p) for p in (good, latin1, huge, tmp_path / "missing.yaml")
    )
    reasons = {Path(d.file).name: (d.line, d.field, d.reason) for d in result.errors}
    assert reasons["l.yaml"] == (0, "file", "cannot read: not UTF-8 text (byte 6)")
    assert reasons["huge.yaml"][2] == "cannot read: file too large (more than 4194304 bytes)"
    assert reasons["missing.yaml"][2].startswith("cannot read: [Errno 2]")
