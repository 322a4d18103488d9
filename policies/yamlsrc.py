"""YAML/JSON documents whose mappings and sequences remember their source lines.

The documents are built straight from the parser's events (libyaml when present), with an explicit
stack instead of `compose` + a recursive walk, so that:

- mappings and sequences become `LDict`/`LList`, plain dict/list subclasses that carry `line` (of
  the node) and `key_lines`/`item_lines`, so diagnostics can say `FILE:LINE`;
- nothing outlives a load: no node tree, and no constructor whose table of constructed objects
  grows with every load (PyYAML's `construct_object` keeps every node it ever saw);
- every size is checked before it is used: the text's length, the nesting depth (libyaml's own
  composer recurses in C and crashes the process on ~50,000 nested brackets), the number of nodes
  after alias expansion ("billion laughs"), recursive and undefined aliases, and YAML tags that
  no policy can carry (`!foo`, `!!python/...`, `!!set`) are diagnostics, never exceptions.
"""

from __future__ import annotations

import json
import re

import yaml

MAX_TEXT_CHARS = 4 * 1024 * 1024  # one policy file; Kubernetes refuses objects past ~1.5 MiB
MAX_NODES = 200_000  # per document, after aliases: a small file can expand exponentially
MAX_TEXT_NODES = 1_000_000  # per text, after aliases: many documents each under MAX_NODES
MAX_DEPTH = 100  # Cilium's policies nest about 8 levels deep
MAX_DOCUMENTS = 10_000  # per text

# libyaml's parser when present (much faster); both give events with start marks.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_RESOLVER = yaml.resolver.Resolver()
# Used only through its scalar constructors, which keep no state (never `construct_object`).
_SCALARS = yaml.constructor.SafeConstructor()
_CORE = "tag:yaml.org,2002:"
_STR, _NULL, _BOOL = _CORE + "str", _CORE + "null", _CORE + "bool"
_INT, _FLOAT, _TIMESTAMP = _CORE + "int", _CORE + "float", _CORE + "timestamp"
_MAP_TAGS = frozenset({None, "!", _CORE + "map"})
_SEQ_TAGS = frozenset({None, "!", _CORE + "seq"})


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


class DocumentError(Exception):
    def __init__(self, line: int, message: str, field: str = "document"):
        super().__init__(message)
        self.line = line
        self.message = message
        self.field = field


def _tag_name(tag: str) -> str:
    return "!!" + tag[len(_CORE) :] if tag.startswith(_CORE) else tag


def _scalar(event: yaml.ScalarEvent, line: int):
    """The value of a scalar, as a JSON-minded reader (Kubernetes) sees it: a timestamp stays
    the string it was written as; tags other than the core JSON types are refused."""
    tag = event.tag
    if tag == "!":
        return event.value
    if tag is None:
        tag = _RESOLVER.resolve(yaml.ScalarNode, event.value, event.implicit)
        if tag == _TIMESTAMP or tag.startswith(_CORE + "merge"):
            return event.value
        if tag in (_INT, _FLOAT) and ":" in event.value:
            # YAML 1.1 base 60 (`1:20` = 80): Kubernetes' reader has no such numbers, so a
            # `port: 1:20` reaches Cilium as the string "1:20" (and is refused there too).
            return event.value
    if tag == _STR:
        return event.value
    if tag == _NULL:
        return None
    node = yaml.ScalarNode(tag, event.value)  # transient: the constructors only read `.value`
    try:
        if tag == _BOOL:
            return _SCALARS.construct_yaml_bool(node)
        if tag == _INT:
            return _SCALARS.construct_yaml_int(node)
        if tag == _FLOAT:
            return _SCALARS.construct_yaml_float(node)
    except (KeyError, ValueError, TypeError, IndexError):
        raise DocumentError(line, f"invalid {_tag_name(tag)} value {event.value[:40]!r}") from None
    raise DocumentError(
        line, f"unsupported YAML tag {_tag_name(tag)!r} (only str, int, float, bool, null)"
    )


class _Budget:
    """Nodes counted after alias expansion, for one text and for its current document."""

    __slots__ = ("text_nodes", "doc_nodes")

    def __init__(self):
        self.text_nodes = 0
        self.doc_nodes = 0

    def spend(self, count: int, line: int) -> None:
        self.text_nodes += count
        self.doc_nodes += count
        if self.doc_nodes > MAX_NODES:
            raise DocumentError(
                line, f"document too large (more than {MAX_NODES} nodes after aliases)"
            )
        if self.text_nodes > MAX_TEXT_NODES:
            raise DocumentError(
                line, f"file too large (more than {MAX_TEXT_NODES} nodes after aliases)"
            )


class _Open:
    """A mapping or sequence being built."""

    __slots__ = ("value", "anchor", "nodes_at_start", "depth", "height", "key", "key_line")

    def __init__(self, value, anchor, nodes_at_start: int, depth: int):
        self.value = value
        self.anchor = anchor
        self.nodes_at_start = nodes_at_start
        self.depth = depth
        self.height = 0  # deepest level below this one, aliases expanded
        self.key = _NO_KEY
        self.key_line = 0


_NO_KEY = object()


class _Builder:
    """One document from events: `feed(event)` until `done`."""

    def __init__(self, offset: int, budget: _Budget):
        self.offset = offset
        self.budget = budget
        budget.doc_nodes = 0
        self.stack: list[_Open] = []
        # anchor -> (value, nodes, height); an anchor still open is in `open_anchors`
        self.anchors: dict[str, tuple[object, int, int]] = {}
        self.open_anchors: set[str] = set()
        self.root = None
        self.done = False

    def line(self, event) -> int:
        return event.start_mark.line + 1 + self.offset

    def path(self) -> str:
        """Where the builder is, in the parser's notation: `spec.ingress[0].toPorts`."""
        out = ""
        for frame in self.stack[:12]:
            if isinstance(frame.value, LList):
                out += f"[{len(frame.value)}]"
            elif frame.key is not _NO_KEY:
                out += f".{frame.key}" if out else str(frame.key)
        if len(self.stack) > 12:
            out += "..."
        return out or "document"

    def feed(self, event) -> None:
        try:
            self._feed(event)
        except DocumentError as exc:
            if exc.field == "document":
                exc.field = self.path()
            raise

    def _feed(self, event) -> None:
        if isinstance(event, yaml.ScalarEvent):
            line = self.line(event)
            self.budget.spend(1, line)
            value = _scalar(event, line)
            if event.anchor is not None:
                self.anchors[event.anchor] = (value, 1, 0)
            self.add(value, line, 0)
        elif isinstance(event, yaml.AliasEvent):
            self.alias(event)
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            self.start(event)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            self.close()

    def start(self, event) -> None:
        line = self.line(event)
        mapping = isinstance(event, yaml.MappingStartEvent)
        if event.tag not in (_MAP_TAGS if mapping else _SEQ_TAGS):
            raise DocumentError(line, f"unsupported YAML tag {_tag_name(event.tag)!r}")
        depth = len(self.stack) + 1
        if depth > MAX_DEPTH:
            raise DocumentError(line, f"document nested deeper than {MAX_DEPTH} levels")
        if self.stack and isinstance(self.stack[-1].value, LDict) and self.stack[-1].key is _NO_KEY:
            raise DocumentError(line, "a mapping key must be a plain value, not a collection")
        self.budget.spend(1, line)
        if event.anchor is not None:
            self.open_anchors.add(event.anchor)
        value = LDict(line) if mapping else LList(line)
        self.stack.append(_Open(value, event.anchor, self.budget.doc_nodes, depth))

    def close(self) -> None:
        done = self.stack.pop()
        if done.anchor is not None:
            self.open_anchors.discard(done.anchor)
            nodes = self.budget.doc_nodes - done.nodes_at_start + 1
            self.anchors[done.anchor] = (done.value, nodes, done.height)
        self.add(done.value, done.value.line, done.height + 1)

    def alias(self, event) -> None:
        line = self.line(event)
        name = event.anchor
        if name in self.open_anchors:
            raise DocumentError(line, "recursive YAML alias")
        if name not in self.anchors:
            raise DocumentError(line, f"undefined YAML alias *{name}")
        value, nodes, height = self.anchors[name]
        if len(self.stack) + height > MAX_DEPTH:
            raise DocumentError(line, f"document nested deeper than {MAX_DEPTH} levels")
        self.budget.spend(nodes, line)
        self.add(value, line, height + (1 if isinstance(value, (LDict, LList)) else 0))

    def add(self, value, line: int, height: int) -> None:
        if not self.stack:
            self.root, self.done = value, True
            return
        top = self.stack[-1]
        top.height = max(top.height, height)
        container = top.value
        if isinstance(container, LList):
            container.append(value)
            container.item_lines.append(line)
        elif top.key is _NO_KEY:
            if isinstance(value, (LDict, LList)):
                raise DocumentError(line, "a mapping key must be a plain value, not a collection")
            key = value if isinstance(value, str) else str(value)
            if key in container:
                raise DocumentError(line, f"duplicate key {key!r}", key)
            top.key, top.key_line = key, line
        else:
            container[top.key] = value
            container.key_lines[top.key] = top.key_line
            top.key = _NO_KEY


def _documents(chunk: str, offset: int, budget: _Budget) -> list[tuple[object, int]]:
    """Every document of one chunk; raises yaml.YAMLError or DocumentError."""
    out = []
    builder = None
    for event in yaml.parse(chunk, Loader=_LOADER):
        if isinstance(event, yaml.DocumentStartEvent):
            builder = _Builder(offset, budget)
            start = event.start_mark.line + 1 + offset
        elif isinstance(event, yaml.DocumentEndEvent):
            if builder is not None and builder.done:
                out.append((builder.root, _first_line(builder.root, start)))
            builder = None
        elif builder is not None:
            builder.feed(event)
    return out


def _first_line(root, start: int) -> int:
    return getattr(root, "line", start) or start


_DOC_START = re.compile(r"^---(?=\s|$)", re.M)


def _split(text: str):
    """The stream cut at `---` lines, each chunk with the 0-based line it starts on, so one
    broken document does not hide the problems of the others. A generator over slices: no list
    of every line of a 4 MiB text."""
    pos, line = 0, 0
    for match in _DOC_START.finditer(text):
        if match.start() == 0:
            continue
        # the '---' line stays at the head of its chunk (it may carry content)
        if text[pos : match.start()].strip():
            yield line, text[pos : match.start()]
        line += text.count("\n", pos, match.start())
        pos = match.start()
    if text[pos:].strip():
        yield line, text[pos:]


def _yaml_error(exc: yaml.YAMLError, start: int) -> DocumentError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    line = mark.line + 1 + start if mark is not None else start + 1
    problem = getattr(exc, "problem", None) or str(exc)
    return DocumentError(line, f"invalid YAML: {problem}")


def _json_documents(text: str, budget: _Budget) -> list[tuple[object, int]] | None:
    """A JSON text: through the YAML reader for line numbers, else json's own values (JSON that
    YAML 1.1 reads differently); None when it is not JSON at all."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    try:
        docs = _documents(text, 0, budget)
    except DocumentError as exc:
        return [(exc, exc.line)]
    except yaml.YAMLError:
        return [(data, 1)] if _depth_ok(data) else None
    return docs or [(data, 1)]


def _depth_ok(data, depth: int = 0) -> bool:
    if depth > MAX_DEPTH:
        return False
    values = data.values() if isinstance(data, dict) else data if isinstance(data, list) else ()
    return all(_depth_ok(v, depth + 1) for v in values)


def load_documents(text: str, name: str = "<string>") -> list[tuple[object, int]]:
    """Every document of a YAML stream (JSON is accepted too) with its first line (1-based).

    A document that does not parse gives a DocumentError entry instead of a value.
    """
    if len(text) > MAX_TEXT_CHARS:
        error = DocumentError(
            1, f"file too large ({len(text)} characters; at most {MAX_TEXT_CHARS})"
        )
        return [(error, 1)]
    budget = _Budget()
    if text.lstrip().startswith(("{", "[")):
        docs = _json_documents(text, budget)
        if docs is not None:
            return docs
    out: list[tuple[object, int]] = []
    for start, chunk in _split(text):
        if len(out) >= MAX_DOCUMENTS:
            error = DocumentError(start + 1, f"more than {MAX_DOCUMENTS} documents in one file")
            out.append((error, error.line))
            break
        try:
            out.extend(_documents(chunk, start, budget))
        except yaml.YAMLError as exc:
            error = _yaml_error(exc, start)
            out.append((error, error.line))
        except DocumentError as exc:
            out.append((exc, exc.line))
            if budget.text_nodes > MAX_TEXT_NODES:
                break
    return out


def plain(value):
    """A loaded value as plain dicts and lists (for a YAML or JSON dumper)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def line_of(container, key, default: int) -> int:
    if isinstance(container, (LDict, LList)):
        return container.line_of(key)
    return default


def line(node, default: int) -> int:
    return getattr(node, "line", default) or default
