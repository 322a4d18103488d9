"""Generate parsers/kafka/schemas.py from Kafka's message specs (JSON) shipped in kafka-python.

Run: .venv/bin/python tests/unit/kafka/gen_schemas.py > parsers/kafka/schemas.py
The spec files are facts (field names, types, version ranges); the table format and the codec that
interprets it are ours. test_schemas_generated.py checks the committed file is up to date.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import kafka.protocol.schemas as _spec_pkg

SPEC_DIR = Path(_spec_pkg.__file__).parent / "resources"
OPEN = 0x7FFF
PRIMITIVES = {
    "bool", "int8", "int16", "uint16", "int32", "int64", "float64", "uuid", "string", "bytes",
    "records",
}  # fmt: skip


def _versions(text: str | None) -> tuple[int, int] | None:
    if text is None or text == "none":
        return None
    if text.endswith("+"):
        return (int(text[:-1]), OPEN)
    if "-" in text:
        lo, hi = text.split("-")
        return (int(lo), int(hi))
    return (int(text), int(text))


def _snake(name: str) -> str:
    s = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", s).lower()


def _default(field: dict, ftype: str):
    raw = field.get("default")
    if raw is None:
        return None
    raw = str(raw)
    if raw == "null":
        return "null"
    if ftype in ("bool",):
        return raw == "true"
    if ftype in ("int8", "int16", "uint16", "int32", "int64"):
        return int(raw, 0)
    if ftype == "float64":
        return float(raw)
    return raw


def _field(field: dict, common: dict) -> tuple:
    ftype = field["type"]
    children = None
    if ftype.startswith("[]"):
        inner = ftype[2:]
        if inner in PRIMITIVES:
            kind = "[]" + inner
        else:
            kind = "[]"
            children = field.get("fields") or common[inner]
    elif ftype in PRIMITIVES:
        kind = ftype
    else:
        kind = "{}"
        children = field.get("fields") or common[ftype]
    sub = tuple(_field(f, common) for f in children) if children is not None else None
    return (
        _snake(field["name"]),
        kind,
        _versions(field["versions"]),
        _versions(field.get("nullableVersions")),
        field.get("tag"),
        _versions(field.get("taggedVersions")),
        _default(field, kind),
        sub,
    )


def load(name: str) -> dict:
    text = (SPEC_DIR / f"{name}.json").read_text()
    return json.loads(re.sub(r"//.*", "", text))


def messages() -> dict[int, dict]:
    out: dict[int, dict] = {}
    for path in sorted(SPEC_DIR.glob("*Request.json")):
        req = load(path.stem)
        resp = load(path.stem[: -len("Request")] + "Response")
        common_req = {c["name"]: c["fields"] for c in req.get("commonStructs", [])}
        common_resp = {c["name"]: c["fields"] for c in resp.get("commonStructs", [])}
        out[req["apiKey"]] = {
            "name": req["name"][: -len("Request")],
            "valid": _versions(req["validVersions"]),
            "flexible": _versions(req["flexibleVersions"]),
            "request": tuple(_field(f, common_req) for f in req["fields"]),
            "response": tuple(_field(f, common_resp) for f in resp["fields"]),
        }
    return out


def render() -> str:
    lines = [
        '"""Kafka request/response schemas, generated from the Kafka message specs; do not edit.',
        "",
        "Regenerate with tests/unit/kafka/gen_schemas.py. A field is",
        "(name, kind, versions, nullable_versions, tag, tagged_versions, default, children);",
        "kind is a primitive, '[]<primitive>', '[]' (array of struct) or '{}' (struct);",
        f"version ranges are (lo, hi) with hi={OPEN} meaning open-ended.",
        '"""',
        "",
        "# fmt: off",
        "MESSAGES = {",
    ]
    for key, msg in sorted(messages().items()):
        lines.append(f"    {key}: {msg!r},")
    lines.append("}")
    lines.append("# fmt: on")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
