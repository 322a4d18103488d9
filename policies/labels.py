"""Cilium labels and label selectors.

A label is `source:key=value`. A selector key without a source (or with source `any`) matches a
label of any source; a label parsed without a source (`unspec`) is matched by any selector source,
so `app=web` typed on the command line meets `k8s:app=web` written in a policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

NAMESPACE_KEY = "io.kubernetes.pod.namespace"
NAMESPACE_LABEL_PREFIX = "io.cilium.k8s.namespace.labels."
ANY_SOURCES = frozenset({"", "any", "unspec"})
DEFAULT_NAMESPACE = "default"


@dataclass(frozen=True, slots=True, order=True)
class Label:
    source: str
    key: str
    value: str

    def __str__(self) -> str:
        prefix = f"{self.source}:" if self.source not in ("", "unspec") else ""
        return f"{prefix}{self.key}={self.value}" if self.value else f"{prefix}{self.key}"


def split_source(key: str) -> tuple[str, str]:
    """`k8s:app` -> ("k8s", "app"); `app` -> ("", "app"). Only the first colon separates."""
    source, sep, rest = key.partition(":")
    if sep and rest and "/" not in source and "." not in source:
        return source, rest
    return "", key


def parse_label(text: str) -> Label:
    text = text.strip()
    if not text:
        raise ValueError("empty label")
    head, _, value = text.partition("=")
    source, key = split_source(head.strip())
    if not key:
        raise ValueError(f"label {text!r} has no key")
    return Label(source or "unspec", key, value.strip())


class LabelSet:
    """An immutable, hashable set of labels, indexed by key for selector matching."""

    __slots__ = ("_labels", "_by_key", "_hash")

    def __init__(self, labels: Iterable[Label] = ()):
        ordered = tuple(sorted(set(labels)))
        self._labels = ordered
        by_key: dict[str, list[Label]] = {}
        for label in ordered:
            by_key.setdefault(label.key, []).append(label)
        self._by_key = {k: tuple(v) for k, v in by_key.items()}
        self._hash = hash(ordered)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], source: str = "k8s") -> LabelSet:
        labels = []
        for key, value in mapping.items():
            src, k = split_source(key)
            labels.append(Label(src or source, k, value))
        return cls(labels)

    def __iter__(self) -> Iterator[Label]:
        return iter(self._labels)

    def __len__(self) -> int:
        return len(self._labels)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelSet) and self._labels == other._labels

    def __repr__(self) -> str:
        return f"LabelSet({str(self)!r})"

    def __str__(self) -> str:
        return ",".join(str(label) for label in self._labels)

    def get(self, source: str, key: str) -> str | None:
        """Value of the first label with this key whose source the selector source accepts."""
        for label in self._by_key.get(key, ()):
            if source in ANY_SOURCES or label.source in ANY_SOURCES or label.source == source:
                return label.value
        return None

    def has(self, source: str, key: str) -> bool:
        return self.get(source, key) is not None

    def namespace(self) -> str | None:
        return self.get("k8s", NAMESPACE_KEY)

    def to_strings(self) -> list[str]:
        return [str(label) for label in self._labels]

    def with_labels(self, labels: Iterable[Label]) -> LabelSet:
        return LabelSet((*self._labels, *labels))


def parse_labels(text: str) -> LabelSet:
    """`"k8s:app=web,team=a"` -> LabelSet. Raises ValueError on an empty key."""
    parts = [p for p in (s.strip() for s in text.split(",")) if p]
    return LabelSet(parse_label(p) for p in parts)


OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")


@dataclass(frozen=True, slots=True)
class Requirement:
    source: str
    key: str
    operator: str  # one of OPERATORS
    values: tuple[str, ...] = ()

    def matches(self, labels: LabelSet) -> bool:
        value = labels.get(self.source, self.key)
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        return value is None

    def __str__(self) -> str:
        key = f"{self.source}:{self.key}" if self.source else self.key
        if self.operator == "In" and len(self.values) == 1:
            return f"{key}={self.values[0]}"
        if self.operator in ("Exists", "DoesNotExist"):
            return f"{key} {self.operator}"
        return f"{key} {self.operator} ({', '.join(self.values)})"


@dataclass(frozen=True, slots=True)
class Selector:
    """A label selector: all requirements ANDed. No requirements selects everything."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: LabelSet) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    @property
    def is_wildcard(self) -> bool:
        return not self.requirements

    def has_key(self, key: str) -> bool:
        return any(r.key == key for r in self.requirements)

    def has_source(self, source: str) -> bool:
        return any(r.source == source for r in self.requirements)

    def with_requirement(self, req: Requirement) -> Selector:
        return Selector((*self.requirements, req))

    def __str__(self) -> str:
        return "{" + ", ".join(str(r) for r in self.requirements) + "}"


def match_label(key: str, value: str) -> Requirement:
    source, k = split_source(key)
    return Requirement(source, k, "In", (value,))
