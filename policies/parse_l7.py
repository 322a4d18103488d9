"""Parsing `toPorts[].rules`: HTTP, Kafka and DNS rules (validated, regexes compiled with RE2),
and the unsupported L7 kind (l7proto) as a fail-closed warning."""

from __future__ import annotations

import re

import re2

from policies import kafka_keys
from policies.fqdn import FQDNSelector
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
from policies.parse_common import (
    _as_dict,
    _check_keys,
    _Ctx,
    _fqdn_selectors,
    _items,
    _key_error,
    _ln,
)

HTTP_KEYS = {"method", "path", "host", "headers", "headerMatches"}
KAFKA_KEYS = {"role", "apiKey", "apiVersion", "clientID", "topic"}
MISMATCH_ACTIONS = {"", "LOG", "ADD", "DELETE", "REPLACE"}
_QUIET = re2.Options()
_QUIET.log_errors = False
KAFKA_TOPIC = re.compile(r"^[a-zA-Z0-9._-]{1,255}$")


def _l7_ports(ports, parser, field, line, entry, ctx: _Ctx) -> list[PortProto] | None:
    """L7 rules are enforced by a TCP proxy: they need a port, and TCP (DNS: UDP, TCP or ANY)."""
    pline = _ln(entry, "ports", line)
    if not ports:
        ctx.error(pline, f"{field}.ports", f"{parser} rules need a port")
        return None
    out = []
    for j, pp in enumerate(ports):
        if pp.port == 0 and not pp.name:
            ctx.error(pline, f"{field}.ports[{j}].port", f"{parser} rules need a non-zero port")
            return None
        if parser == "dns":
            if pp.proto == PROTO_SCTP:
                ctx.error(pline, f"{field}.ports[{j}].protocol", "dns rules apply to UDP and TCP")
                return None
        elif pp.proto != PROTO_TCP:
            # Cilium refuses ANY (and an omitted protocol) too: the rule could not mean UDP/SCTP
            proto = {PROTO_UDP: "UDP", PROTO_SCTP: "SCTP", PROTO_ANY: "ANY"}[pp.proto]
            reason = f"{parser} rules apply to TCP, not {proto}"
            if pp.proto == PROTO_ANY:
                reason += ": write protocol: TCP (Cilium refuses L7 rules on ANY too)"
            ctx.error(pline, f"{field}.ports[{j}].protocol", reason)
            return None
        out.append(pp)
    return out


L7_TYPES = ("http", "kafka", "dns", "l7proto")


def _parse_l7(node, field, line, ctx: _Ctx) -> tuple[L7Rules | None, bool]:
    """(rules, drop): drop=True when the port rule must be dropped fail-closed."""
    node = _as_dict(ctx, node, field, line)
    if node is None:
        return None, False
    _check_keys(ctx, node, (*L7_TYPES, "l7"), field, line, "L7 rule type")
    present = [k for k in L7_TYPES if k in node]
    if len(present) > 1:
        ctx.error(
            _ln(node, present[1], line),
            f"{field}.{present[1]}",
            f"two L7 parser types on one port ({' and '.join(present)})",
        )
        return None, False
    if "dns" in node:
        return L7Rules("dns", dns=tuple(_parse_dns(node, field, line, ctx))), False
    if "l7" in node and "l7proto" not in node:
        _key_error(ctx, node, "l7", field, line, "l7 needs l7proto (as in Cilium)")
        return None, False
    if "l7proto" in node:
        ctx.warn(
            _ln(node, "l7proto", line),
            f"{field}.l7proto",
            "generic L7 parsers (l7proto) are not enforced: this port rule is dropped, so these "
            "ports are not allowed by it",
        )
        return None, True
    for parser, parse_one in (("http", _parse_http), ("kafka", _parse_kafka)):
        if parser in node:
            rules = [
                r
                for it, ifield, iline in _items(ctx, node, parser, field, line)
                if (r := parse_one(it, ifield, iline, ctx)) is not None
            ]
            return L7Rules(parser, **{parser: tuple(rules)}), False
    return None, False


def _parse_dns(node, field, line, ctx: _Ctx) -> list[FQDNSelector]:
    """`dns: [{matchName: ...} | {matchPattern: ...}]`: the names the DNS proxy forwards."""
    return _fqdn_selectors(ctx, node, "dns", field, line)


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
    ok = _check_keys(ctx, item, HTTP_KEYS, field, line, "HTTP rule field")
    values = {}
    for key in ("method", "path", "host"):
        if key in item and item[key] not in (None, ""):
            v = _check_regex(ctx, item[key], f"{field}.{key}", _ln(item, key, line))
            ok = ok and v is not None
            values[key] = v or ""
    headers, headers_ok = _headers(item, field, line, ctx)
    matches = _header_matches(item, field, line, ctx)
    if matches is None:  # a secret-valued requirement: the rule never matches
        return HttpRule(method="(?!)", path="(?!)")
    if not (ok and headers_ok and matches[1]):
        return None
    return HttpRule(
        values.get("method", ""),
        values.get("path", ""),
        values.get("host", ""),
        (*headers, *matches[0]),
    )


def _headers(item, field, line, ctx: _Ctx) -> tuple[list[HeaderMatch], bool]:
    """`headers: ['Name value', 'Name']`: (requirements, all well-formed)."""
    out, ok = [], True
    for h, hfield, hline in _items(ctx, item, "headers", field, line):
        if not isinstance(h, str) or not h.strip():
            ctx.error(hline, hfield, "must be 'Name value' or 'Name'")
            ok = False
            continue
        name, sep, value = h.strip().partition(" ")
        out.append(HeaderMatch(name.rstrip(":"), value if sep else None))
    return out, ok


def _header_matches(item, field, line, ctx: _Ctx) -> tuple[list[HeaderMatch], bool] | None:
    """`headerMatches`: (matches, all well-formed), or None when a requirement's value is a
    Kubernetes secret (not loaded: the rule must never match)."""
    out, ok = [], True
    for m, mfield, mline in _items(ctx, item, "headerMatches", field, line):
        if not isinstance(m, dict) or not m.get("name"):
            ctx.error(mline, mfield, "needs name (and value, mismatch)")
            ok = False
            continue
        ok = _check_keys(ctx, m, ("name", "value", "secret", "mismatch"), mfield, mline) and ok
        mismatch = str(m.get("mismatch") or "").upper()
        if mismatch not in MISMATCH_ACTIONS:
            _key_error(
                ctx,
                m,
                "mismatch",
                mfield,
                mline,
                f"unknown mismatch action {m.get('mismatch')!r}; expected LOG, ADD, DELETE or REPLACE",
            )
            ok = False
            continue
        if "secret" in m:
            if not mismatch:
                _secret_warning(m, mfield, mline, ctx, "this HTTP rule never matches (fail closed)")
                return None
            _secret_warning(
                m,
                mfield,
                mline,
                ctx,
                f"the {mismatch} action for header {m['name']!r} is not applied",
            )
            continue
        value = m.get("value")
        out.append(HeaderMatch(str(m["name"]), None if value is None else str(value), mismatch))
    return out, ok


def _secret_warning(m, mfield, mline, ctx: _Ctx, consequence: str) -> None:
    ctx.warn(
        _ln(m, "secret", mline),
        f"{mfield}.secret",
        f"header values from Kubernetes secrets are not loaded: {consequence}",
    )


def _parse_kafka(item, field, line, ctx: _Ctx) -> KafkaRule | None:
    item = _as_dict(ctx, item, field, line)
    if item is None:
        return None
    if not _check_keys(ctx, item, KAFKA_KEYS, field, line, "Kafka rule field"):
        return None
    text: list[str] = []
    keys = _kafka_api_keys(item, field, line, ctx, text)
    if keys is None:
        return None
    version = _kafka_version(item, field, line, ctx, text)
    if version is False:
        return None
    client = str(item.get("clientID") or "")
    if client:
        text.append(f"clientID={client}")
    topic = str(item.get("topic") or "")
    if topic:
        if not KAFKA_TOPIC.match(topic):
            _key_error(ctx, item, "topic", field, line, f"invalid Kafka topic name {topic!r}")
            return None
        text.append(f"topic={topic}")
    return KafkaRule(keys, version, client, topic, "{" + " ".join(text) + "}" if text else "{any}")


def _kafka_api_keys(item, field, line, ctx: _Ctx, text: list[str]) -> tuple[int, ...] | None:
    """The API keys a rule covers (role or apiKey; none: every key)."""
    if item.get("role") and item.get("apiKey"):
        _key_error(ctx, item, "apiKey", field, line, "role and apiKey are mutually exclusive")
        return None
    if item.get("role"):
        role = str(item["role"]).lower()
        if role not in kafka_keys.ROLES:
            _key_error(
                ctx,
                item,
                "role",
                field,
                line,
                f"unknown role {item['role']!r}; expected produce or consume",
            )
            return None
        text.append(f"role={role}")
        return kafka_keys.ROLES[role]
    if item.get("apiKey") in (None, ""):
        return ()
    number = kafka_keys.api_key_number(item["apiKey"])
    if number is None:
        _key_error(
            ctx,
            item,
            "apiKey",
            field,
            line,
            f"unknown Kafka apiKey {item['apiKey']!r}; expected a number or one of "
            + ", ".join(kafka_keys.API_KEYS),
        )
        return None
    text.append(f"apiKey={kafka_keys.api_key_name(number)}")
    return (number,)


def _kafka_version(item, field, line, ctx: _Ctx, text: list[str]):
    """The apiVersion (None: any), or False when it is invalid."""
    if item.get("apiVersion") in (None, ""):
        return None
    raw = str(item["apiVersion"]).strip()
    if not raw.isdigit() or int(raw) > 32767:
        _key_error(
            ctx, item, "apiVersion", field, line, f"invalid apiVersion {item['apiVersion']!r}"
        )
        return False
    text.append(f"apiVersion={int(raw)}")
    return int(raw)
