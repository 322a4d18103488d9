"""Loading policy text: YAML/JSON streams in, rules and diagnostics out.

Pure: the caller reads the files (`l7proxy.policy_files` does, for the CLI, the agent and the
gateway) and hands over `(name, text)` pairs, so this package never touches the filesystem.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from policies.conflicts import parser_conflicts
from policies.diagnostics import ERROR, Diagnostic, PolicyError
from policies.model import Rule
from policies.parse import _Ctx, parse_document
from policies.yamlsrc import DocumentError, load_documents


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
    """Parse one YAML/JSON stream."""
    return load_sources([(name, text)], strict=strict)


def load_sources(
    sources: Iterable[tuple[str, str]],
    *,
    diagnostics: Iterable[Diagnostic] = (),
    strict: bool = False,
) -> LoadResult:
    """Parse several named texts as one policy set (conflicts are checked across them).

    `diagnostics` are problems the caller found before parsing (a file it could not read); they
    count like any other. With strict=True any error raises PolicyError.
    """
    result = LoadResult(diagnostics=list(diagnostics))
    for name, text in sources:
        result.files.append(name)
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
    errors_before = ctx.error_count()
    for doc, line in docs:
        if isinstance(doc, DocumentError):
            ctx.error(doc.line, doc.field, doc.message)
            continue
        result.rules.extend(parse_document(doc, line, ctx))
    if len(result.rules) == before and ctx.error_count() == errors_before:
        ctx.error(1, "document", "no network policy in this file")
