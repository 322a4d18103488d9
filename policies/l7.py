"""Compiled L7 rule sets: the proxy's hot path.

`HttpRuleSet.check` answers with one RE2 Set match over `METHOD \\n HOST \\n PATH`: every rule is
one set member `(?m:method)\\n(?m:host)\\n(?m:path)`, full-anchored. The input carries exactly two
newlines and every member needs two literal newlines, so no user regex can eat a separator; `(?m)`
makes a user's `^`/`$` mean the start/end of its own field. Rules a set cannot express exactly
(`\\A`, `\\z`, inline flags that change `m`) and inputs that contain a newline take the slow path:
one full match per field per rule. Header conditions are checked only for the rules the set hit.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import re2

from policies.kafka_keys import METADATA, api_key_name
from policies.model import HeaderMatch, HttpRule, KafkaRule
from policies.ruleset_text import RuleSetText

_SET_OPTIONS = re2.Options()
_SET_OPTIONS.max_mem = 64 << 20  # room for a few thousand rules in one automaton
_SET_OPTIONS.log_errors = False
_UNSAFE_FOR_SET = re.compile(r"\\A|\\z|\(\?[a-zA-Z]*-?[a-zA-Z]*m")


@dataclass(frozen=True, slots=True)
class HttpVerdict:
    allowed: bool
    matched: tuple[int, ...]  # indexes of the rules that allow the request
    header_actions: tuple[tuple[str, str, str], ...] = ()  # (ADD|DELETE|REPLACE|LOG, name, value)


@dataclass(frozen=True, slots=True)
class KafkaVerdict:
    allowed: bool
    denied_topics: tuple[str, ...] = ()
    matched: tuple[int, ...] = ()


_HTTP_DENY = HttpVerdict(False, ())
_HTTP_ALLOW_ALL = HttpVerdict(True, ())
_KAFKA_DENY = KafkaVerdict(False)
_KAFKA_ALLOW_ALL = KafkaVerdict(True)


def _full(pattern: str):
    return re2.compile(pattern) if pattern else None


class _CompiledHttpRule:
    __slots__ = (
        "rule",
        "method",
        "path",
        "host",
        "required",
        "actions",
        "in_set",
        "required_keys",
        "action_keys",
    )

    def __init__(self, rule: HttpRule):
        self.rule = rule
        self.method = _full(rule.method)
        self.path = _full(rule.path)
        self.host = _full(rule.host)
        self.required = tuple(h for h in rule.headers if not h.mismatch)
        self.actions = tuple(h for h in rule.headers if h.mismatch)
        self.required_keys = tuple((h.name.lower(), h.value) for h in self.required)
        self.action_keys = tuple(
            (h.name.lower(), h.value, (h.mismatch, h.name, h.value or "")) for h in self.actions
        )
        self.in_set = not any(
            _UNSAFE_FOR_SET.search(p) for p in (rule.method, rule.path, rule.host)
        )

    def set_pattern(self) -> str:
        parts = [
            f"(?m:{p})" if p else "(?s:.*)"
            for p in (self.rule.method, self.rule.host, self.rule.path)
        ]
        return "\n".join(parts)

    def request_matches(self, method: str, path: str, host: str) -> str | None:
        """None when method, path and host all match, else the first field that did not."""
        if self.method is not None and self.method.fullmatch(method) is None:
            return "method"
        if self.path is not None and self.path.fullmatch(path) is None:
            return "path"
        if self.host is not None and self.host.fullmatch(host) is None:
            return "host"
        return None


def _header_values(headers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    table: dict[str, list[str]] = {}
    for name, value in headers:
        key = name.lower()
        values = table.get(key)
        if values is None:
            table[key] = [value]
        else:
            values.append(value)
    return table


def _header_ok(h: HeaderMatch, table: dict[str, list[str]]) -> bool:
    values = table.get(h.name.lower())
    if values is None:
        return False
    return h.value is None or h.value in values


class HttpRuleSet(RuleSetText):
    parser = "http"

    def __init__(self, rules: Sequence[HttpRule], allow_all: bool = False, sources=()):
        self.rules = tuple(rules)
        self.sources = tuple(sources) or ("",) * len(self.rules)
        self.allow_all = allow_all or any(_is_any(r) for r in self.rules)
        self._compiled = tuple(_CompiledHttpRule(r) for r in self.rules)
        self._header_rules = frozenset(
            i for i, c in enumerate(self._compiled) if c.required or c.actions
        )
        self._needs_headers = bool(self._header_rules)
        self._verdicts: dict[tuple[int, ...], HttpVerdict] = {}  # hits -> shared verdict
        self._set_index: list[int] = []
        self._set = None
        members = [i for i, c in enumerate(self._compiled) if c.in_set]
        if members:
            rs = re2.Set.FullMatchSet(_SET_OPTIONS)
            for i in members:
                try:
                    rs.Add(self._compiled[i].set_pattern())
                except re2.error:
                    self._compiled[i].in_set = False  # exact slow path for this rule
                    continue
                self._set_index.append(i)
            try:
                rs.Compile()
            except re2.error:
                # too big for one automaton: every rule takes the exact slow path
                for i in self._set_index:
                    self._compiled[i].in_set = False
                self._set_index = []
            else:
                self._set = rs if self._set_index else None
        self._slow = tuple(i for i, c in enumerate(self._compiled) if not c.in_set)
        self._identity_index = self._set_index == list(range(len(self._set_index)))

    def check(
        self, method: str, path: str, host: str, headers: Sequence[tuple[str, str]] = ()
    ) -> HttpVerdict:
        if self.allow_all:
            return _HTTP_ALLOW_ALL
        key = f"{method}\n{host}\n{path}"
        if key.count("\n") != 2:
            hits = self._slow_hits(method, path, host, range(len(self._compiled)))
        else:
            hits = self._set.Match(key) if self._set is not None else None
            if hits is not None and not self._identity_index:
                hits = [self._set_index[h] for h in hits]
            if self._slow:
                extra = self._slow_hits(method, path, host, self._slow)
                if extra:
                    hits = sorted((hits or []) + extra)
        if not hits:
            return _HTTP_DENY
        if self._needs_headers:
            header_rules = self._header_rules
            for i in hits:
                if i in header_rules:
                    return self._check_headers(hits, headers)
        key = tuple(hits)
        verdict = self._verdicts.get(key)
        if verdict is None:
            verdict = HttpVerdict(True, tuple(sorted(key)))
            if len(self._verdicts) < 4096:
                self._verdicts[key] = verdict
        return verdict

    def _slow_hits(self, method, path, host, indexes) -> list[int]:
        compiled = self._compiled
        return [i for i in indexes if compiled[i].request_matches(method, path, host) is None]

    def _check_headers(self, hits, headers) -> HttpVerdict:
        table = _header_values(headers)
        passed = []
        actions: list[tuple[str, str, str]] = []
        for i in sorted(hits) if len(hits) > 1 else hits:
            c = self._compiled[i]
            ok = True
            for lname, value in c.required_keys:
                values = table.get(lname)
                if values is None or (value is not None and value not in values):
                    ok = False
                    break
            if not ok:
                continue
            passed.append(i)
            for lname, value, action in c.action_keys:
                values = table.get(lname)
                if (values is None or (value is not None and value not in values)) and (
                    action not in actions
                ):
                    actions.append(action)
        if not passed:
            return _HTTP_DENY
        return HttpVerdict(True, tuple(passed), tuple(actions))

    def explain(self, method: str, path: str, host: str, headers=()) -> list[tuple[int, bool, str]]:
        """Per rule: (index, matched, why) for traces. Not on the hot path."""
        if self.allow_all and not self.rules:
            return [(-1, True, "allow-all (a plain L4 allow covers this port)")]
        table = _header_values(headers)
        out = []
        for i, c in enumerate(self._compiled):
            miss = c.request_matches(method, path, host)
            if miss is not None:
                want = getattr(c.rule, miss)
                got = {"method": method, "path": path, "host": host}[miss]
                out.append((i, False, f"{miss} {got!r} does not match {want!r}"))
                continue
            missing = [h for h in c.required if not _header_ok(h, table)]
            if missing:
                h = missing[0]
                shown = h.name if h.value is None else f"{h.name}: {h.value}"
                out.append((i, False, f"header {shown!r} is missing or different"))
                continue
            out.append((i, True, "method, path, host and headers match"))
        if self.allow_all and self.rules and not any(m for _, m, _ in out):
            out.append((-1, True, "allow-all (a plain L4 allow covers this port)"))
        return out


def _is_any(rule: HttpRule) -> bool:
    return not (rule.method or rule.path or rule.host or rule.headers)


class _KafkaKeyIndex:
    """The rules for one API key: unconditional ones indexed by topic, the rest (apiVersion or
    clientID constraints) kept in a short list checked per request."""

    __slots__ = ("any_topic", "topics", "conditional", "any_topic_verdict", "first_verdict")

    def __init__(self, rules: Sequence[KafkaRule], indexes: Sequence[int]):
        self.any_topic: int | None = None
        self.topics: dict[str, int] = {}
        conditional = []
        for i in indexes:
            r = rules[i]
            if r.api_version is not None or r.client_id:
                conditional.append(i)
            elif not r.topic:
                if self.any_topic is None:
                    self.any_topic = i
            else:
                self.topics.setdefault(r.topic, i)
        self.conditional = tuple(conditional)
        self.any_topic_verdict = KafkaVerdict(True, (), (self.any_topic,))
        first = min(self.topics.values(), default=-1)
        self.first_verdict = KafkaVerdict(True, (), (first,))


class KafkaRuleSet(RuleSetText):
    parser = "kafka"

    def __init__(self, rules: Sequence[KafkaRule], allow_all: bool = False, sources=()):
        self.rules = tuple(rules)
        self.sources = tuple(sources) or ("",) * len(self.rules)
        self.allow_all = allow_all or any(
            not (r.api_keys or r.api_version is not None or r.client_id or r.topic)
            for r in self.rules
        )
        any_key = [i for i, r in enumerate(self.rules) if not r.api_keys]
        by_key: dict[int, list[int]] = {}
        for i, r in enumerate(self.rules):
            for k in r.api_keys:
                by_key.setdefault(k, []).append(i)
        self._keys = {
            k: _KafkaKeyIndex(self.rules, sorted(set(v) | set(any_key))) for k, v in by_key.items()
        }
        self._other_keys = _KafkaKeyIndex(self.rules, any_key)
        visible = [r for r in self.rules if not r.api_keys or METADATA in r.api_keys]
        self._all_visible = self.allow_all or any(not r.topic for r in visible)
        self._visible = frozenset(r.topic for r in visible if r.topic)

    def check(
        self, api_key: int, api_version: int, client_id: str | None, topics: Sequence[str] = ()
    ) -> KafkaVerdict:
        if self.allow_all:
            return _KAFKA_ALLOW_ALL
        index = self._keys.get(api_key, self._other_keys)
        rules = self.rules
        cond = ()
        if index.conditional:
            cond = [
                i
                for i in index.conditional
                if (rules[i].api_version is None or rules[i].api_version == api_version)
                and (not rules[i].client_id or rules[i].client_id == client_id)
            ]
        if index.any_topic is not None:
            return index.any_topic_verdict
        if not topics:
            # Cilium: a request that names no topic passes on any rule for its key/version/client.
            if index.topics:
                return index.first_verdict
            return KafkaVerdict(True, (), tuple(cond)) if cond else _KAFKA_DENY
        cond_any = [i for i in cond if not rules[i].topic]
        if cond_any:
            return KafkaVerdict(True, (), tuple(cond_any))
        by_topic = index.topics
        if len(topics) == 1:
            found = by_topic.get(topics[0])
            if found is not None:
                return KafkaVerdict(True, (), (found,))
        matched: set[int] = set()
        denied: list[str] = []
        for topic in topics:
            found = by_topic.get(topic)
            if found is None:
                found = next((i for i in cond if rules[i].topic == topic), None)
            if found is None:
                if topic not in denied:
                    denied.append(topic)
            else:
                matched.add(found)
        if denied:
            return KafkaVerdict(False, tuple(denied))
        return KafkaVerdict(True, (), tuple(sorted(matched)))

    def topic_visible(self, topic: str) -> bool:
        """Whether an all-topics Metadata response may show this topic (extension)."""
        return self._all_visible or topic in self._visible

    def explain(self, api_key, api_version, client_id, topics=()) -> list[tuple[int, bool, str]]:
        if self.allow_all and not self.rules:
            return [(-1, True, "allow-all (a plain L4 allow covers this port)")]
        out = []
        for i, r in enumerate(self.rules):
            if r.api_keys and api_key not in r.api_keys:
                out.append((i, False, f"apiKey {api_key_name(api_key)} is not in the rule"))
            elif r.api_version is not None and r.api_version != api_version:
                out.append((i, False, f"apiVersion {api_version} != {r.api_version}"))
            elif r.client_id and r.client_id != client_id:
                out.append((i, False, f"clientID {client_id!r} != {r.client_id!r}"))
            elif r.topic and topics and r.topic not in topics:
                out.append((i, False, f"topic {r.topic!r} is not among {list(topics)}"))
            else:
                out.append((i, True, "matches"))
        return out


L7RuleSet = HttpRuleSet | KafkaRuleSet
