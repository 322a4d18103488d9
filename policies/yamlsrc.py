"""YAML/JSON documents whose mappings and sequences remember their source lines.

`compose_all` gives nodes with start marks; we turn them into plain dict/list subclasses that carry
`line` (of the node) and `key_lines` (line of each key), so diagnostics can say `FILE:LINE`.
"""

from __future__ import annotations

import json
import re

import yaml


class LDict(dict):
    """A dict with the line of the mapping and of each key (1-based)."""

    __slots__ = ("line", "key_lines")

    def __init__(self, line: int = 0):
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LList(list):
    __slots__ = ("line", "item_lines")

    def __init__(self, line: int = 0):
        super().__init__()
        self.line = line
        self.item_lines: list[int] = []

    def line_of(self, index: int) -> int:
        return self.item_lines[index] if index < len(self.item_lines) else self.line


_CONSTRUCTOR = yaml.SafeLoader("")
# libyaml's parser when present (much faster); both give nodes with start marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _scalar(node: yaml.ScalarNode):
    return _CONSTRUCTOR.construct_object(node, deep=True)


MAX_NODES = 200_000  # aliases can expand a small file exponentially ("billion laughs")
MAX_DEPTH = 100


class _Budget:
    __slots__ = ("nodes", "path")

    def __init__(self):
        self.nodes = 0
        self.path: set[int] = set()


def _convert(node: yaml.Node, offset: int = 0, budget: _Budget | None = None, depth: int = 0):
    budget = budget or _Budget()
    line = node.start_mark.line + 1 + offset
    budget.nodes += 1
    if budget.nodes > MAX_NODES:
        raise DocumentError(line, f"document too large (more than {MAX_NODES} nodes after aliases)")
    if depth > MAX_DEPTH:
        raise DocumentError(line, f"document nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, yaml.ScalarNode):
        return _scalar(node)
    if id(node) in budget.path:
        raise DocumentError(line, "recursive YAML alias")
    budget.path.add(id(node))
    try:
        if isinstance(node, yaml.MappingNode):
            out = LDict(line)
            for key_node, value_node in node.value:
                key = _convert(key_node, offset, budget, depth + 1)
                key = key if isinstance(key, str) else str(key)
                key_line = key_node.start_mark.line + 1 + offset
                if key in out:
                    raise DocumentError(key_line, f"duplicate key {key!r}", key)
                out[key] = _convert(value_node, offset, budget, depth + 1)
                out.key_lines[key] = key_line
            return out
        seq = LList(line)
        for item in node.value:
            seq.append(_convert(item, offset, budget, depth + 1))
            seq.item_lines.append(item.start_mark.line + 1 + offset)
        return seq
    finally:
        budget.path.discard(id(node))


_DOC_START = re.compile(r"^---(\s|$)")


def _split(text: str) -> list[tuple[int, str]]:
    """The stream cut at `---` lines, each chunk with the 0-based line it starts on, so one
    broken document does not hide the problems of the others."""
    chunks: list[tuple[int, str]] = []
    start, lines = 0, []
    for i, raw in enumerate(text.splitlines(keepends=True)):
        if _DOC_START.match(raw):
            chunks.append((start, "".join(lines)))
            # keep the '---' line (it may carry content) but blank so line numbers stay right
            start, lines = i, [raw]
        else:
            lines.append(raw)
    chunks.append((start, "".join(lines)))
    return [(s, c) for s, c in chunks if c.strip()]


def load_documents(text: str, name: str = "<string>") -> list[tuple[object, int]]:
    """Every document of a YAML stream (JSON is accepted too) with its first line (1-based).

    A document that does not parse gives a DocumentError entry instead of a value.
    """
    if text.lstrip().startswith(("{", "[")):
        try:
            data = json.loads(text)
        except ValueError:
            pass
        else:
            try:
                node = yaml.compose(text, Loader=_LOADER)
                return [(_convert(node), node.start_mark.line + 1)]
            except (yaml.YAMLError, DocumentError):
                return [(data, 1)]
    out: list[tuple[object, int]] = []
    for start, chunk in _split(text):
        try:
            nodes = list(yaml.compose_all(chunk, Loader=_LOADER))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
            line = mark.line + 1 + start if mark is not None else start + 1
            problem = getattr(exc, "problem", None) or str(exc)
            out.append((DocumentError(line, f"invalid YAML: {problem}"), line))
            continue
        for node in nodes:
            if node is None:
                continue
            try:
                out.append((_convert(node, start), node.start_mark.line + 1 + start))
            except DocumentError as exc:
                out.append((exc, exc.line))
    return out


class DocumentError(Exception):
    def __init__(self, line: int, message: str, field: str = "document"):
        super().__init__(message)
        self.line = line
        self.message = message
        self.field = field


def line_of(container, key, default: int) -> int:
    if isinstance(container, (LDict, LList)):
        return container.line_of(key)
    return default


def line(node, default: int) -> int:
    return getattr(node, "line", default) or default
