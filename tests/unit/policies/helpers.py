"""Small builders for policy tests: YAML text in, compiled policy out."""

from __future__ import annotations

import textwrap

import policies as P


def load(text: str, name: str = "t.yaml") -> P.LoadResult:
    return P.load_text(textwrap.dedent(text), name)


def rules(text: str) -> list[P.Rule]:
    result = load(text)
    assert result.ok, [str(d) for d in result.diagnostics]
    return result.rules


def labels(text: str, namespace: str = "default") -> P.LabelSet:
    ls = P.parse_labels(text)
    if text.startswith("reserved:") or ls.namespace() is not None:
        return ls
    return P.parse_labels(f"{text},k8s:io.kubernetes.pod.namespace={namespace}")


class World:
    """Endpoints by name plus a compiled policy, with one-line verdict helpers."""

    def __init__(self, text: str, endpoints: dict[str, str], revision: int = 1, state=None):
        self.allocator = P.IdentityAllocator(state)
        self.ipcache = P.IPCache()
        self.endpoints = {name: labels(spec) for name, spec in endpoints.items()}
        self.rules = rules(text) if isinstance(text, str) else text
        self.compiled = P.compile_policy(
            self.rules, self.endpoints, self.allocator, self.ipcache, revision
        )

    def id(self, name: str) -> int:
        return self.compiled.endpoints[name].identity

    def verdict(self, dst: str, src, port: int, proto: int = 6, direction: int = P.INGRESS):
        peer = self.id(src) if isinstance(src, str) else src
        return P.l4_verdict(self.compiled, dst, peer, direction, proto, port)

    def action(self, dst: str, src, port: int, proto: int = 6, direction: int = P.INGRESS) -> str:
        return self.verdict(dst, src, port, proto, direction).action

    def rule_set(self, dst: str, src, port: int, proto: int = 6, direction: int = P.INGRESS):
        v = self.verdict(dst, src, port, proto, direction)
        assert v.action == "redirect", v
        return self.compiled.l7[v.l7_id]
