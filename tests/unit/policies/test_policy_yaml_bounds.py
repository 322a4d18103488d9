"""The policy reader's bounds (issue 19): YAML tags, sizes, nesting, aliases and memory.

Every malformed input gives `FILE:LINE: FIELD: reason`, never an exception, and a load leaves
nothing behind in the process.
"""

from __future__ import annotations

import gc
import sys

import pytest

import policies as P
from policies import yamlsrc
from tests.shared import CILIUM_EXAMPLES

POLICY = """\
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: {name}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromEndpoints: [{{matchLabels: {{app: {peer}}}}}]
    toPorts:
    - ports: [{{port: "{port}", protocol: TCP}}]
"""


def errors(text: str, name: str = "p.yaml") -> list[str]:
    result = P.load_text(text, name)  # must not raise
    return [str(d) for d in result.errors]


@pytest.mark.parametrize(
    ("name", "peer", "port", "expected"),
    [
        ("!foo x", "api", "80", "p.yaml:4: metadata.name: unsupported YAML tag '!foo'"),
        ("x", "!!python/object:os.system api", "80", "p.yaml:8: spec.ingress[0].fromEndpoints[0]"),
        ("x", "api", "!!binary gA==", "p.yaml:10: spec.ingress[0].toPorts[0].ports[0].port:"),
        ("!!int nine", "api", "80", "p.yaml:4: metadata.name: invalid !!int value 'nine'"),
        ("!!bool maybe", "api", "80", "p.yaml:4: metadata.name: invalid !!bool value 'maybe'"),
        ("!!float x", "api", "80", "p.yaml:4: metadata.name: invalid !!float value 'x'"),
    ],
)
def test_a_yaml_tag_anywhere_is_a_diagnostic(name, peer, port, expected):
    found = errors(POLICY.format(name=name, peer=peer, port=port))
    assert len(found) == 1 and found[0].startswith(expected), found


def test_tags_on_collections_and_keys():
    assert errors("a: !!set {x}\n") == ["p.yaml:1: a: unsupported YAML tag '!!set'"]
    assert errors("a:\n  b: !foo [1]\n") == ["p.yaml:2: a.b: unsupported YAML tag '!foo'"]
    assert errors("!k a: 1\n")[0].startswith("p.yaml:1: document: unsupported YAML tag '!k'")
    # the core tags and the non-specific `!` are fine
    text = POLICY.format(name="!!str x", peer="! api", port="80")
    assert P.load_text(text, "p.yaml").ok


def test_plain_values_read_as_kubernetes_reads_them():
    docs = yamlsrc.load_documents("a: 2001-13-45\nb: 2020-01-01\nc: 0x1F\nd: yes\ne: ~\n<<: 1\n")
    assert docs[0][0] == {
        "a": "2001-13-45",
        "b": "2020-01-01",
        "c": 31,
        "d": True,
        "e": None,
        "<<": 1,
    }


def test_every_nesting_depth_is_refused_before_anything_recurses():
    # libyaml's own composer segfaults on ~50,000 nested brackets; json.loads hits RecursionError
    for text in ("[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000):
        assert errors(text) == [
            f"p.yaml:1: {'[0]' * 12 if text[0] == '[' else '.'.join('a' * 12)}...: "
            f"document nested deeper than {yamlsrc.MAX_DEPTH} levels"
        ]
    deep_block = "".join(f"{' ' * i}k{i}:\n" for i in range(150)) + " " * 150 + "v\n"
    assert "nested deeper than" in errors(deep_block)[0]
    # an alias cannot smuggle depth in: 60 + 60 levels
    anchored = "a: &x " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 60 + "*x" + "]" * 60 + "\n"
    assert "nested deeper than" in errors(anchored)[0]


def test_file_size_and_node_counts_are_bounded():
    big = "a: " + "x" * yamlsrc.MAX_TEXT_CHARS
    assert errors(big) == [
        f"p.yaml:1: document: file too large ({len(big)} characters; at most "
        f"{yamlsrc.MAX_TEXT_CHARS})"
    ]
    # a flat document over the per-document node budget
    flat = "[" + "1," * (yamlsrc.MAX_NODES + 1) + "1]"
    assert "document too large" in errors(flat)[0]
    # many documents, each under the per-document budget, over the per-file one
    docs = "\n---\n".join(
        "x: &a [" + ", ".join(["1"] * 1000) + "]\ny: [" + ", ".join(["*a"] * 150) + "]"
        for _ in range(8)
    )
    found = errors(docs)
    assert found[-1].endswith(
        f"file too large (more than {yamlsrc.MAX_TEXT_NODES} nodes after aliases)"
    )


def test_alias_bombs_undefined_and_recursive_aliases():
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        laughs += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]\n"
    assert errors(laughs)[0].startswith("p.yaml:6: f[")
    assert "document too large" in errors(laughs)[0]
    assert errors("a: *nowhere\n") == ["p.yaml:1: a: undefined YAML alias *nowhere"]
    assert errors("a: &x [*x]\n") == ["p.yaml:1: a[0]: recursive YAML alias"]
    assert errors("? [a, b]\n: c\n") == [
        "p.yaml:1: document: a mapping key must be a plain value, not a collection"
    ]
    # aliases to scalars and small collections stay fine and share nothing mutable with the text
    text = POLICY.format(name="&n x", peer="*n", port="80")
    assert P.load_text(text, "p.yaml").ok


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4


def test_ten_thousand_loads_and_compiles_stay_within_a_fixed_memory_bound():
    """Issue 19: every load leaked its YAML nodes (~10 KiB for an ordinary Cilium example) into
    a module-level constructor's table; 20,000 loads grew a process from 22 to 225 MiB."""
    texts = [p.read_text() for p in sorted(CILIUM_EXAMPLES.glob("*.yaml"))] or [
        POLICY.format(name="x", peer="api", port="80")
    ]
    endpoints = {"a": P.parse_labels("k8s:app=api,k8s:io.kubernetes.pod.namespace=default")}

    def load_and_compile(i: int) -> None:
        text = texts[i % len(texts)]
        if i % 2:
            text = text.replace("name:", f"name: v{i}-", 1)  # identical text or not
        result = P.load_text(text, "x.yaml")
        if result.ok:
            P.compile_policy(result.rules, endpoints, P.IdentityAllocator(), P.IPCache(), 1)

    for i in range(300):
        load_and_compile(i)
    gc.collect()
    blocks, rss = sys.getallocatedblocks(), _rss_kib()
    for i in range(10_000):
        load_and_compile(i)
    gc.collect()
    grown_blocks = sys.getallocatedblocks() - blocks
    grown_rss = _rss_kib() - rss
    # before the fix: ~1,300,000 blocks and ~100 MiB
    assert grown_blocks < 5_000, grown_blocks
    assert grown_rss < 8 * 1024, grown_rss


def test_a_file_of_many_small_broken_documents_gives_a_bounded_answer():
    """4 MiB of `---` lines made a million documents and a million diagnostics (40 s)."""
    from policies.parse_common import MAX_DIAGNOSTICS

    for text in ("---\n" * 1_000_000, "---\na: 1\n" * 400_000):
        result = P.load_text(text[: yamlsrc.MAX_TEXT_CHARS], "p.yaml")
        assert len(result.diagnostics) == MAX_DIAGNOSTICS + 1
        assert str(result.diagnostics[-1]).endswith(
            f"file: more than {MAX_DIAGNOSTICS} problems in this file; the rest are not listed"
        )
        assert not result.ok
    docs = yamlsrc.load_documents("---\na: 1\n" * (yamlsrc.MAX_DOCUMENTS + 5))
    assert len(docs) == yamlsrc.MAX_DOCUMENTS + 1
    assert docs[-1][0].message == f"more than {yamlsrc.MAX_DOCUMENTS} documents in one file"


def test_left_out_problems_still_make_the_file_invalid():
    from policies.diagnostics import Diagnostic
    from policies.parse_common import MAX_DIAGNOSTICS, _Ctx

    diags: list[Diagnostic] = []
    ctx = _Ctx("p.yaml", diags)
    for i in range(MAX_DIAGNOSTICS + 3):
        ctx.warn(i + 1, "f", "w")
    assert len(diags) == MAX_DIAGNOSTICS + 1 and not diags[-1].is_error
    ctx.error(9999, "f", "e")  # left out, but the file is not valid
    assert len(diags) == MAX_DIAGNOSTICS + 1 and diags[-1].is_error and ctx.error_count() == 1


def test_cidr_identities_of_rules_gone_are_released():
    """One allocator and ipcache across reloads, a different CIDR each time (a gateway or agent
    living through many policy changes): the identity table and the ipcache stay bounded, and a
    CIDR still named keeps its identity."""
    from policies import IdentityAllocator, IPCache, compile_policy, load_text, parse_labels

    allocator, ipcache = IdentityAllocator(), IPCache()
    endpoints = {"web": parse_labels("app=web")}
    template = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {{name: p}}
spec:
  endpointSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - fromCIDR: ["192.0.2.0/24", "10.{a}.{b}.0/24"]
"""
    kept = None
    for i in range(300):
        rules = load_text(template.format(a=i // 256, b=i % 256), "p.yaml").rules
        compile_policy(rules, endpoints, allocator, ipcache, i + 1)
        number = ipcache.get("192.0.2.0/24")
        assert kept in (None, number), "a CIDR still named kept its identity"
        kept = number
    cidr_ids = [n for n in allocator.identities() if n >= 1 << 24]
    assert len(cidr_ids) == 2, cidr_ids
    assert sorted(c for c, _ in ipcache.items()) == ["10.1.43.0/24", "192.0.2.0/24"]


def test_base_60_numbers_stay_strings_as_kubernetes_reads_them():
    """YAML 1.1 reads `1:20` as 80; Kubernetes' reader (and so Cilium) sees the string "1:20",
    which is not a port. Red-team finding: `port: 1:20` was enforced here as port 80."""
    from policies import load_text

    text = """
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - toPorts:
    - ports:
      - {port: 1:20, protocol: TCP}
"""
    result = load_text(text, "p.yaml")
    errors = [d for d in result.diagnostics if d.severity == "error"]
    assert errors and "1:20" in errors[0].reason and errors[0].line == 10
