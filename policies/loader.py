"""Loading policy files: the only place in `policies` that touches the filesystem."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from policies.conflicts import parser_conflicts
from policies.diagnostics import ERROR, Diagnostic, PolicyError
from policies.model import Rule
from policies.parse import _Ctx, parse_document
from policies.yamlsrc import DocumentError, load_documents

SUFFIXES = (".yaml", ".yml", ".json")


@dataclass(slots=True)
class LoadResult:
    rules: list[Rule] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.is_error]

    @property
    def ok(self) -> bool:
        return not self.errors


def load_text(text: str, name: str = "<string>", *, strict: bool = False) -> LoadResult:
    """Parse one YAML/JSON stream (pure; used by load_paths and by tests)."""
    result = LoadResult()
    _load_into(result, text, name)
    result.diagnostics.extend(parser_conflicts(result.rules))
    if strict and result.errors:
        raise PolicyError(result.diagnostics)
    return result


def _load_into(result: LoadResult, text: str, name: str) -> None:
    ctx = _Ctx(name, result.diagnostics)
    docs = load_documents(text, name)
    if not docs:
        result.diagnostics.append(
            Diagnostic(name, 1, "document", "no policy documents found", ERROR)
        )
        return
    before = len(result.rules)
    errors_before = sum(1 for d in result.diagnostics if d.is_error)
    for doc, line in docs:
        if isinstance(doc, DocumentError):
            result.diagnostics.append(Diagnostic(name, doc.line, doc.field, doc.message, ERROR))
            continue
        result.rules.extend(parse_document(doc, line, ctx))
    errors_now = sum(1 for d in result.diagnostics if d.is_error)
    if len(result.rules) == before and errors_now == errors_before:
        result.diagnostics.append(
            Diagnostic(name, 1, "document", "no network policy in this file", ERROR)
        )


def _expand(paths: Iterable[str | Path]) -> list[Path]:
    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file()))
        else:
            out.append(path)
    return out


def load_paths(paths: Iterable[str | Path], *, strict: bool = False) -> LoadResult:
    """Load files (directories are walked for .yaml/.yml/.json). Problems become diagnostics;
    with strict=True any error raises PolicyError."""
    result = LoadResult()
    for path in _expand(paths):
        name = str(path)
        result.files.append(name)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            result.diagnostics.append(Diagnostic(name, 0, "file", f"cannot read: {exc}", ERROR))
            continue
        _load_into(result, text, name)
    result.diagnostics.extend(parser_conflicts(result.rules))
    if strict and result.errors:
        raise PolicyError(result.diagnostics)
    return result
