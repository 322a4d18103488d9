"""Sample requests generated from the schema table, and kafka-python's classes by API key."""

from __future__ import annotations

import importlib
import pkgutil

from parsers.kafka.codec import _in

TOPIC_ID = bytes(range(1, 17))


def sample(fields: tuple, version: int, name_hint: str = "") -> dict:
    """One element in every array, so responses mirror something; strings name themselves."""
    value = {}
    for name, kind, versions, _nv, tag, tagged, _default, children in fields:
        if not _in(versions, version) or (tag is not None and _in(tagged, version)):
            continue
        if kind == "[]":
            value[name] = [sample(children, version, name)]
        elif kind == "{}":
            value[name] = sample(children, version, name)
        elif kind == "[]string":
            value[name] = [f"{name}-0"]
        elif kind.startswith("[]"):
            value[name] = [1] if kind != "[]uuid" else [TOPIC_ID]
        elif kind == "string":
            value[name] = f"{name_hint}.{name}"
        elif kind in ("bytes", "records"):
            value[name] = b"\x00\x01"
        elif kind == "uuid":
            value[name] = TOPIC_ID
        elif kind == "bool":
            value[name] = True
        elif kind == "float64":
            value[name] = 1.5
        elif name in ("resource_type", "resource_type_filter"):
            value[name] = 2
        elif name == "key_type":
            value[name] = 0
        else:
            value[name] = 1
    return value


def kafka_python_classes() -> tuple[dict, dict]:
    """(requests, responses) by API key from kafka-python's spec-driven protocol classes."""
    from kafka.protocol.api_message import ApiMessage

    for sub in ("admin", "consumer", "metadata", "producer"):
        pkg = importlib.import_module(f"kafka.protocol.{sub}")
        for mod in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"kafka.protocol.{sub}.{mod.name}")

    def walk(cls):
        for s in cls.__subclasses__():
            yield s
            yield from walk(s)

    reqs, resps = {}, {}
    for cls in walk(ApiMessage):
        if cls._class_version is not None:
            continue
        (reqs if cls.is_request() else resps)[cls.API_KEY] = cls
    return reqs, resps
