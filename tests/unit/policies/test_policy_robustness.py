"""Malformed documents give diagnostics, never exceptions (seeded structural mutations)."""

import copy
import random
from pathlib import Path

import yaml

import policies as P

CORPUS = Path(__file__).resolve().parents[2] / "policies" / "valid"
ODD_VALUES = [None, 5, -1, 70000, "", "x y", [], {}, [1, 2], {"a": 1}, True, 1.5, "*", [None], [{}]]


def mutate(node, rng):
    """Replace one random value somewhere in the tree with an odd one."""
    if isinstance(node, dict) and node:
        key = rng.choice(list(node))
        if rng.random() < 0.3 or not isinstance(node[key], (dict, list)):
            node[key] = copy.deepcopy(rng.choice(ODD_VALUES))
        else:
            mutate(node[key], rng)
    elif isinstance(node, list) and node:
        i = rng.randrange(len(node))
        if rng.random() < 0.3 or not isinstance(node[i], (dict, list)):
            node[i] = copy.deepcopy(rng.choice(ODD_VALUES))
        else:
            mutate(node[i], rng)


def test_mutated_documents_only_ever_produce_diagnostics():
    docs = []
    for path in sorted(CORPUS.iterdir()):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    rng = random.Random(1234)
    errors = 0
    for n in range(600):
        doc = yaml.safe_load(yaml.safe_dump(rng.choice(docs)))
        for _ in range(rng.randrange(1, 4)):
            mutate(doc, rng)
        text = yaml.safe_dump(doc)
        result = P.load_text(text, f"m{n}.yaml")  # must not raise
        errors += not result.ok
        for d in result.diagnostics:
            assert d.line >= 1 and d.field and d.reason, (text, d)
        if result.ok:
            eps = {"a": P.parse_labels("k8s:app=api,k8s:io.kubernetes.pod.namespace=shop")}
            P.compile_policy(result.rules, eps, P.IdentityAllocator(), P.IPCache(), 1)
    assert errors > 100  # the mutations do break documents


def test_non_policy_yaml_and_garbage():
    for text in [
        "",
        "---\n",
        "42",
        "- a\n- b",
        "a: [",
        "\t{",
        "apiVersion: v1\nkind: Pod\n",
        '{"kind": 1}',
    ]:
        result = P.load_text(text, "g.yaml")
        assert not result.ok and all(d.line >= 1 for d in result.diagnostics), text


def test_recursive_and_exponential_aliases_are_rejected():
    recursive = P.load_text("a: &x [*x]\n", "r.yaml")
    assert [d.reason for d in recursive.errors] == ["recursive YAML alias"]
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 9):
        laughs += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join([f"*{chr(96 + i)}"] * 10) + "]\n"
    bomb = P.load_text(laughs, "bomb.yaml")
    assert not bomb.ok and "too large" in bomb.errors[0].reason
