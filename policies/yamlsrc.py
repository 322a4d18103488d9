"""YAML/JSON documents whose mappings and sequences remember their source lines.

`compose_all` gives nodes with start marks; we turn them into plain dict/list subclasses that carry
`line` (of the node) and `key_lines` (line of each key), so diagnostics can say `FILE:LINE`.
"""

from __future__ import annotations

import json

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


def _scalar(node: yaml.ScalarNode):
    return _CONSTRUCTOR.construct_object(node, deep=True)


def _convert(node: yaml.Node):
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out = LDict(line)
        for key_node, value_node in node.value:
            key = _convert(key_node)
            if isinstance(key, (LDict, LList)):
                key = str(key)
            out[key if isinstance(key, str) else str(key)] = _convert(value_node)
            out.key_lines[key if isinstance(key, str) else str(key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        out = LList(line)
        for item in node.value:
            out.append(_convert(item))
            out.item_lines.append(item.start_mark.line + 1)
        return out
    return _scalar(node)


def load_documents(text: str, name: str = "<string>") -> list[tuple[object, int]]:
    """Every document in a YAML stream (JSON is accepted too) with its first line.

    Raises ValueError(line, message) style errors as `DocumentError`.
    """
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        if text.lstrip().startswith(("{", "[")):
            try:
                data = json.loads(text)
            except ValueError:
                pass
            else:
                return [(data, 1)]
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise DocumentError(line, f"invalid YAML: {problem}") from None
    return [(_convert(n), n.start_mark.line + 1) for n in nodes if n is not None]


class DocumentError(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


def line_of(container, key, default: int) -> int:
    if isinstance(container, (LDict, LList)):
        return container.line_of(key)
    return default


def line(node, default: int) -> int:
    return getattr(node, "line", default) or default
