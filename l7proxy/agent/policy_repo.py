"""The policy repository: policy documents keyed by kind/namespace/name, with revisions.

`policy import` hands the agent whole files. They are split into documents, merged over the
stored set (a document with the same key replaces the old one), and the merged set is loaded and
compiled before anything is stored. Only when that succeeds does the store swap the set and bump
the revision in one transaction, so an invalid file changes nothing.

The policy engine loads from paths, so each compile writes the documents of the set into a fresh
temporary directory, one file per document, and loads that.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

import yaml

import policies
from l7proxy.agent.api import ApiError
from l7proxy.agent.store import PolicyDoc
from l7proxy.policy_files import load_paths
from policies.yamlsrc import DocumentError, load_documents, plain

KIND_SHORT = {
    "CiliumNetworkPolicy": "cnp",
    "CiliumClusterwideNetworkPolicy": "ccnp",
    "NetworkPolicy": "netpol",
}
CLUSTERWIDE = {"CiliumClusterwideNetworkPolicy"}


def split_documents(filename: str, text: str, revision: int) -> list[PolicyDoc]:
    """One PolicyDoc per YAML/JSON document in a file (a `kind: List` is flattened)."""
    raw = []
    # the policy engine's reader: bounded (size, depth, aliases) and never raising on a YAML tag
    for doc, _ in load_documents(text, filename):
        if isinstance(doc, DocumentError):
            reason = doc.message.removeprefix("invalid YAML: ")
            raise ApiError(f"{filename}:{doc.line}: {doc.field}: not valid YAML or JSON: {reason}")
        if doc is not None:
            raw.append(plain(doc))
    docs: list[dict] = []
    for doc in raw:
        if isinstance(doc, dict) and doc.get("kind") == "List":
            docs.extend(i for i in doc.get("items") or () if isinstance(i, dict))
        else:
            docs.append(doc)
    out = []
    for doc in docs:
        if not isinstance(doc, dict):
            raise ApiError(f"{filename}: document: a policy must be a mapping")
        kind = str(doc.get("kind", ""))
        meta = doc.get("metadata") or {}
        name = str(meta.get("name") or "")
        if kind not in KIND_SHORT:
            raise ApiError(f"{filename}: kind: {kind or 'missing'} is not a policy kind")
        if not name:
            raise ApiError(f"{filename}: metadata.name: every imported policy needs a name")
        namespace = "" if kind in CLUSTERWIDE else str(meta.get("namespace") or "default")
        key = (
            f"{KIND_SHORT[kind]}/{namespace}/{name}" if namespace else f"{KIND_SHORT[kind]}/{name}"
        )
        body = yaml.safe_dump(doc, sort_keys=False)
        out.append(PolicyDoc(key, name, namespace, filename, body, revision))
    return out


def merge(current: Iterable[PolicyDoc], new: Iterable[PolicyDoc]) -> list[PolicyDoc]:
    by_key = {d.key: d for d in current}
    for doc in new:
        by_key[doc.key] = doc
    return [by_key[k] for k in sorted(by_key)]


def remove(current: Iterable[PolicyDoc], name: str) -> tuple[list[PolicyDoc], list[str]]:
    """Drop the documents called `name` (or whose key is `name`); return what stays and what went."""
    keep, gone = [], []
    for doc in current:
        (gone if name in (doc.name, doc.key) else keep).append(doc)
    return keep, [d.key for d in gone]


def load_rules(docs: list[PolicyDoc]):
    """Load the documents with the policy engine; raise ApiError with its diagnostics."""
    if not docs:
        return []
    with tempfile.TemporaryDirectory(prefix="l7proxy-policy-") as tmp:
        paths = []
        for i, doc in enumerate(docs):
            path = Path(tmp) / f"{i:04d}-{doc.key.replace('/', '_')}.yaml"
            path.write_text(doc.text)
            paths.append(str(path))
        try:
            result = load_paths(paths, strict=True)
        except policies.PolicyError as exc:
            raise ApiError(
                "the merged policy set is invalid; nothing changed",
                [str(d) for d in exc.diagnostics],
            ) from None
    return list(result.rules)


def to_json(docs: list[PolicyDoc], revision: int) -> dict:
    return {
        "revision": revision,
        "policies": [
            {
                "key": d.key,
                "name": d.name,
                "namespace": d.namespace,
                "source": d.source,
                "revision": d.revision,
                "document": yaml.safe_load(d.text),
            }
            for d in docs
        ],
    }


def render_yaml(docs: list[PolicyDoc]) -> str:
    return "---\n".join(d.text for d in docs)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
