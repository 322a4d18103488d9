"""Reading policy files for the policy engine, which does no I/O itself.

`load_paths` is what the CLI, the agent and the gateway call: directories are walked for
.yaml/.yml/.json, each file is read with a size bound (a file past the engine's limit is refused
before it is read whole), and an unreadable file becomes a `FILE:0: file: reason` diagnostic.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from policies.diagnostics import ERROR, Diagnostic
from policies.loader import LoadResult, load_sources
from policies.yamlsrc import MAX_TEXT_CHARS

SUFFIXES = (".yaml", ".yml", ".json")


def expand(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; directories become their policy files, sorted."""
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        else:
            out.append(path)
    return out


def read_policy_file(path: str | Path) -> str:
    """The text of one policy file; OSError or ValueError (too large, not UTF-8) says why not."""
    with open(path, "rb") as f:
        data = f.read(MAX_TEXT_CHARS + 1)
    if len(data) > MAX_TEXT_CHARS:
        raise ValueError(f"file too large (more than {MAX_TEXT_CHARS} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text (byte {exc.start})") from None


def read_sources(paths: Iterable[str | Path]) -> tuple[list[tuple[str, str]], list[Diagnostic]]:
    """(name, text) for every readable file, and a diagnostic for every other one."""
    sources, problems = [], []
    for path in expand(paths):
        name = str(path)
        try:
            sources.append((name, read_policy_file(path)))
        except (OSError, ValueError) as exc:
            problems.append(Diagnostic(name, 0, "file", f"cannot read: {exc}", ERROR))
    return sources, problems


def load_paths(paths: Iterable[str | Path], *, strict: bool = False) -> LoadResult:
    """Load files as one policy set. Problems become diagnostics; with strict=True any error
    raises policies.PolicyError."""
    sources, problems = read_sources(paths)
    result = load_sources(sources, diagnostics=problems, strict=strict)
    result.files[:0] = [d.file for d in problems]
    return result
