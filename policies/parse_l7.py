"""Parsing `toPorts[].rules`: HTTP and Kafka rules (validated, regexes compiled with RE2), and the
unsupported L7 kinds (dns, l7proto) as fail-closed warnings."""

from __future__ import annotations

import re

import re2

from policies import kafka_keys
from policies.model import (
    PROTO_ANY,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    HeaderMatch,
    HttpRule,
    KafkaRule,
    L7Rules,
    PortProto,
)
from policies.parse_common import _as_dict, _as_list, _Ctx, _ln

HTTP_KEYS = {"method", "path", "host", "headers", "headerMatches"}
KAFKA_KEYS = {"role", "apiKey", "apiVersion", "clientID", "topic"}
MISMATCH_ACTIONS = {"", "LOG", "ADD", "DELETE", "REPLACE"}
_QUIET = re2.Options()
_QUIET.log_errors = False
KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,255}$")


def _l7_ports(ports, parser, field, line, entry, ctx: _Ctx) -> list[PortProto] | None:
    """L7 rules are enforced by a TCP proxy: they need a port, and TCP."""
    pline = _ln(entry, "ports", line)
    if not ports:
        ctx.error(pline, f"{field}.ports", f"{parser} rules need a port")
        return None
    out = []
    for j, pp in enumerate(ports):
        if pp.port == 0 and not pp.name:
            ctx.error(pline, f"{field}.ports[{j}].port", f"{parser} rules need a non-zero port")
            return None
        if pp.proto in (PROTO_UDP, PROTO_SCTP):
            proto = "UDP" if pp.proto == PROTO_UDP else "SCTP"
            ctx.error(
                pline, f"{field}.ports[{j}].protocol", f"{parser} rules apply to TCP, not {proto}"
            )
            return None
        if pp.proto == PROTO_ANY:
            ctx.warn(
                pline,
                f"{field}.ports[{j}].protocol",
                f"{parser} rules apply to TCP only: UDP and SCTP on port {pp.port} are not "
                "allowed by this rule",
            )
            pp = PortProto(pp.port, pp.end_port, PROTO_TCP, pp.name)
        out.append(pp)
    return out


def _parse_l7(node, field, line, ctx: _Ctx) -> tuple[L7Rules | None, bool]:
    """(rules, drop): drop=True when the port rule must be dropped fail-closed."""
    node = _as_dict(ctx, node, field, line)
    if node is None:
        return None, False
    for key in node:
        if key not in ("http", "kafka", "dns", "l7proto", "l7"):
            ctx.error(_ln(node, key, line), f"{field}.{key}", "unknown L7 rule type")
    present = [k for k in ("http", "kafka", "dns", "l7proto") if k in node]
    if len(present) > 1:
        ctx.error(
            _ln(node, present[1], line),
            f"{field}.{present[1]}",
            f"two L7 parser types on one port ({' and '.join(present)})",
        )
        return None, False
    if "dns" in node:
        patterns = _as_list(ctx, node["dns"], f"{field}.dns", _ln(node, "dns", line))
        if any(isinstance(p, dict) and p.get("matchPattern") == "*" for p in patterns):
            ctx.warn(
                _ln(node, "dns", line),
                f"{field}.dns",
                "DNS rules are not enforced: matchPattern '*' allows every name, so the port is "
                "allowed at L4 without DNS visibility or FQDN learning",
            )
            return None, False
        ctx.warn(
            _ln(node, "dns", line),
            f"{field}.dns",
            "DNS rules are not enforced: this port rule is dropped, so DNS to these peers is not "
            "allowed by it",
        )
        return None, True
    if "l7proto" in node or "l7" in node:
        key = "l7proto" if "l7proto" in node else "l7"
        ctx.warn(
            _ln(node, key, line),
            f"{field}.{key}",
            "generic L7 parsers (l7proto) are not enforced: this port rule is dropped, so these "
            "ports are not allowed by it",
        )
        return None, True
    if "http" in node:
        items = _as_list(ctx, node["http"], f"{field}.http", _ln(node, "http", line))
        rules = [
            r
            for i, it in enumerate(items)
            if (r := _parse_http(it, f"{field}.http[{i}]", _ln(items, i, line), ctx)) is not None
        ]
        return L7Rules("http", http=tuple(rules)), False
    if "kafka" in node:
        items = _as_list(ctx, node["kafka"], f"{field}.kafka", _ln(node, "kafka", line))
        rules = [
            r
            for i, it in enumerate(items)
            if (r := _parse_kafka(it, f"{field}.kafka[{i}]", _ln(items, i, line), ctx)) is not None
        ]
        return L7Rules("kafka", kafka=tuple(rules)), False
    return None, False


def _check_regex(ctx, value, field, line) -> str | None:
    if not isinstance(value, str):
        ctx.error(line, field, f"must be a string (an RE2 regular expression), got {value!r}")
        return None
    try:
        re2.compile(value, options=_QUIET)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        ctx.error(line, field, f"invalid RE2 regular expression {value!r}: {reason}")
        return None
    return value


def _parse_http(item, field, line, ctx: _Ctx) -> HttpRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    ok = True
    for key in item:
        if key not in HTTP_KEYS:
            ctx.error(_ln(item, key, line), f"{field}.{key}", "unknown HTTP rule field")
            ok = False
    values = {}
    for key in ("method", "path", "host"):
        if key in item and item[key] not in (None, ""):
            v = _check_regex(ctx, item[key], f"{field}.{key}", _ln(item, key, line))
            if v is None:
                ok = False
            values[key] = v or ""
    headers: list[HeaderMatch] = []
    hnode = _as_list(ctx, item.get("headers"), f"{field}.headers", _ln(item, "headers", line))
    for i, h in enumerate(hnode):
        if not isinstance(h, str) or not h.strip():
            ctx.error(
                _ln(hnode, i, line), f"{field}.headers[{i}]", "must be 'Name value' or 'Name'"
            )
            ok = False
            continue
        name, sep, value = h.strip().partition(" ")
        headers.append(HeaderMatch(name.rstrip(":"), value if sep else None))
    mnode = _as_list(
        ctx, item.get("headerMatches"), f"{field}.headerMatches", _ln(item, "headerMatches", line)
    )
    for i, m in enumerate(mnode):
        mfield, mline = f"{field}.headerMatches[{i}]", _ln(mnode, i, line)
        if not isinstance(m, dict) or not m.get("name"):
            ctx.error(mline, mfield, "needs name (and value, mismatch)")
            ok = False
            continue
        for key in m:
            if key not in ("name", "value", "secret", "mismatch"):
                ctx.error(_ln(m, key, mline), f"{mfield}.{key}", "unknown field")
                ok = False
        mismatch = str(m.get("mismatch") or "").upper()
        if mismatch not in MISMATCH_ACTIONS:
            ctx.error(
                _ln(m, "mismatch", mline),
                f"{mfield}.mismatch",
                f"unknown mismatch action {m.get('mismatch')!r}; expected LOG, ADD, DELETE or REPLACE",
            )
            ok = False
            continue
        if "secret" in m:
            if mismatch:
                ctx.warn(
                    _ln(m, "secret", mline),
                    f"{mfield}.secret",
                    "header values from Kubernetes secrets are not loaded: the "
                    f"{mismatch} action for header {m['name']!r} is not applied",
                )
                continue
            ctx.warn(
                _ln(m, "secret", mline),
                f"{mfield}.secret",
                "header values from Kubernetes secrets are not loaded: this HTTP rule never "
                "matches (fail closed)",
            )
            return HttpRule(method="(?!)", path="(?!)")  # never matches
        value = m.get("value")
        headers.append(HeaderMatch(str(m["name"]), None if value is None else str(value), mismatch))
    if not ok:
        return None
    return HttpRule(
        values.get("method", ""), values.get("path", ""), values.get("host", ""), tuple(headers)
    )


def _parse_kafka(item, field, line, ctx: _Ctx) -> KafkaRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    for key in item:
        if key not in KAFKA_KEYS:
            ctx.error(_ln(item, key, line), f"{field}.{key}", "unknown Kafka rule field")
            return None
    if item.get("role") and item.get("apiKey"):
        ctx.error(
            _ln(item, "apiKey", line), f"{field}.apiKey", "role and apiKey are mutually exclusive"
        )
        return None
    keys: tuple[int, ...] = ()
    text = []
    if item.get("role"):
        role = str(item["role"]).lower()
        if role not in kafka_keys.ROLES:
            ctx.error(
                _ln(item, "role", line),
                f"{field}.role",
                f"unknown role {item['role']!r}; expected produce or consume",
            )
            return None
        keys = kafka_keys.ROLES[role]
        text.append(f"role={role}")
    elif item.get("apiKey") not in (None, ""):
        number = kafka_keys.api_key_number(item["apiKey"])
        if number is None:
            ctx.error(
                _ln(item, "apiKey", line),
                f"{field}.apiKey",
                f"unknown Kafka apiKey {item['apiKey']!r}; expected a number or one of "
                + ", ".join(kafka_keys.API_KEYS),
            )
            return None
        keys = (number,)
        text.append(f"apiKey={kafka_keys.api_key_name(number)}")
    version = None
    if item.get("apiVersion") not in (None, ""):
        raw = str(item["apiVersion"]).strip()
        if not raw.isdigit() or int(raw) > 32767:
            ctx.error(
                _ln(item, "apiVersion", line),
                f"{field}.apiVersion",
                f"invalid apiVersion {item['apiVersion']!r}",
            )
            return None
        version = int(raw)
        text.append(f"apiVersion={version}")
    client = str(item.get("clientID") or "")
    if client:
        text.append(f"clientID={client}")
    topic = str(item.get("topic") or "")
    if topic:
        if not KAFKA_TOPIC.match(topic):
            ctx.error(
                _ln(item, "topic", line), f"{field}.topic", f"invalid Kafka topic name {topic!r}"
            )
            return None
        text.append(f"topic={topic}")
    return KafkaRule(keys, version, client, topic, "{" + " ".join(text) + "}" if text else "{any}")
