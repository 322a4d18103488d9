"""Graphviz DOT output of a map dict (`DepMap.to_dict()` or `/map.json`)."""

from __future__ import annotations

from typing import Any


def _quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_line(node: dict[str, Any]) -> str:
    shape = {"world": "ellipse", "host": "house"}.get(node["kind"], "box")
    return f"    {_quote(node['id'])} [label={_quote(node['name'])}, shape={shape}];"


def edge_label(edge: dict[str, Any]) -> str:
    parts = [f"{edge['protocol']}/{edge['port']}", f"forwarded {edge['forwarded']}"]
    parts.append(f"dropped {edge['dropped']}")
    if edge.get("errors"):
        parts.append(f"errors {edge['errors']}")
    return "\n".join(parts)


def to_dot(graph: dict[str, Any]) -> str:
    """Nodes grouped in one cluster per namespace; edges with drops are red."""
    lines = ["digraph depmap {", "  rankdir=LR;", '  node [fontname="sans-serif"];']
    by_namespace: dict[str, list[dict]] = {}
    for node in graph["nodes"]:
        by_namespace.setdefault(node.get("namespace") or "", []).append(node)
    for index, (namespace, nodes) in enumerate(sorted(by_namespace.items())):
        if namespace:
            lines.append(f"  subgraph cluster_{index} {{")
            lines.append(f"    label={_quote('namespace ' + namespace)};")
            lines.extend(_node_line(n) for n in nodes)
            lines.append("  }")
        else:
            lines.extend(_node_line(n)[2:] for n in nodes)
    for edge in graph["edges"]:
        color = "red" if edge["dropped"] else "black"
        lines.append(
            f"  {_quote(edge['source'])} -> {_quote(edge['target'])} "
            f"[label={_quote(edge_label(edge))}, color={color}, fontcolor={color}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"
