"""Parsing L3/L4 pieces of a peer rule: CIDRs, ports (numbers, ranges, names), toPorts and icmps."""

from __future__ import annotations

import ipaddress
import re

from policies import icmp
from policies.model import (
    PROTO_NUMBERS,
    CIDRRule,
    ICMPField,
    PortProto,
    PortRule,
)
from policies.parse_common import _as_list, _check_keys, _Ctx, _items, _key_error, _ln, _unenforced
from policies.parse_l7 import _l7_ports, _parse_l7

NAMED_PORT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")
MAX_PORTS = 40  # per toPorts entry, as in Cilium's sanitizer
MAX_ICMP_FIELDS = 40
PORT_RULE_KEYS = ("ports", "rules", "terminatingTLS", "originatingTLS", "serverNames", "listener")
NOT_ENFORCED = (
    ("terminatingTLS", "TLS termination"),
    ("originatingTLS", "TLS origination"),
    ("serverNames", "the TLS server-name (SNI) restriction"),
    ("listener", "the custom Envoy listener"),
)


# ---------------------------------------------------------------------------------------------
# CIDRs


def _parse_cidrs(item, prefix, field, line, ctx: _Ctx) -> list[CIDRRule]:
    out = []
    for text, cfield, cline in _items(ctx, item, f"{prefix}CIDR", field, line):
        net = _network(text, cfield, cline, ctx, bare_address=True)
        if net is not None:
            out.append(CIDRRule(net))
    for entry, efield, eline in _items(ctx, item, f"{prefix}CIDRSet", field, line):
        rule = _cidr_set_entry(entry, efield, eline, ctx)
        if rule is not None:
            out.append(rule)
    return out


def _cidr_set_entry(entry, efield, eline, ctx: _Ctx) -> CIDRRule | None:
    if not isinstance(entry, dict):
        ctx.error(eline, efield, "must be a mapping with cidr (and except)")
        return None
    if "cidr" not in entry:
        _cidr_group_or_missing(entry, efield, eline, ctx)
        return None
    net = _network(entry["cidr"], f"{efield}.cidr", _ln(entry, "cidr", eline), ctx)
    if net is None:
        return None
    excepts = []
    for ex, xfield, xline in _items(ctx, entry, "except", efield, eline):
        exnet = _network(ex, xfield, xline, ctx)
        if exnet is None:
            continue
        if exnet.version != net.version or not exnet.subnet_of(net):
            ctx.error(xline, xfield, f"{exnet} is not inside {net}")
            continue
        excepts.append(exnet)
    return CIDRRule(net, tuple(excepts))


def _cidr_group_or_missing(entry, efield, eline, ctx: _Ctx) -> None:
    for other in ("cidrGroupRef", "cidrGroupSelector"):
        if other in entry:
            ctx.warn(
                _ln(entry, other, eline),
                f"{efield}.{other}",
                f"{other} is not enforced: CiliumCIDRGroup objects are not loaded, so "
                "this entry allows nothing",
            )
            return
    ctx.error(eline, f"{efield}.cidr", "is required")


def _network(text, field, line, ctx: _Ctx, *, bare_address: bool = False):
    """A prefix `addr/len`. Only plain fromCIDR/toCIDR take a bare address (as a host prefix);
    Cilium refuses one in a CIDR set, where `10.0.0.1` would read as `10.0.0.1/32`."""
    text = str(text)
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False)
        addr = ipaddress.ip_address(text)
    except ValueError:
        ctx.error(line, field, f"invalid CIDR {text!r}")
        return None
    if not bare_address:
        ctx.error(
            line,
            field,
            f"{text!r} has no prefix length: write {addr}/{addr.max_prefixlen} "
            "(only fromCIDR/toCIDR take a bare address)",
        )
        return None
    return ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")


# ---------------------------------------------------------------------------------------------
# Ports


def _parse_port(entry, field, line, ctx: _Ctx, *, require_port: bool = True) -> PortProto | None:
    """One `{port, endPort, protocol}`. Cilium requires `port`; a Kubernetes NetworkPolicy port
    without one means every port (require_port=False)."""
    if not isinstance(entry, dict):
        ctx.error(line, field, "must be a mapping with port and protocol")
        return None
    _check_keys(ctx, entry, ("port", "endPort", "protocol"), field, line)
    proto = _protocol(entry, field, line, ctx)
    if proto is None:
        return None
    raw = entry.get("port")
    if raw in (None, "") and require_port:
        ctx.error(line, f"{field}.port", "is required (a number 0-65535 or a port name)")
        return None
    found = _port_number(raw, f"{field}.port", _ln(entry, "port", line), ctx)
    if found is None:
        return None
    port, name = found
    end_port = port
    if entry.get("endPort") is not None:
        end_port = _end_port(entry, port, name, field, line, ctx)
        if end_port is None:
            return None
    return PortProto(port, end_port if port else 0, proto, name)


def _protocol(entry, field, line, ctx: _Ctx) -> int | None:
    proto_text = str(entry.get("protocol") or "ANY").upper()
    if proto_text not in PROTO_NUMBERS:
        _key_error(
            ctx,
            entry,
            "protocol",
            field,
            line,
            f"unknown protocol {entry.get('protocol')!r}; expected TCP, UDP, SCTP or ANY",
        )
        return None
    return PROTO_NUMBERS[proto_text]


def _port_number(raw, field, line, ctx: _Ctx) -> tuple[int, str] | None:
    """(number, "") or (0, name)."""
    text = str(raw if raw is not None else "0").strip()
    if text.isdigit():
        port = int(text)
        if port > 65535:
            ctx.error(line, field, f"port {port} is out of range 0-65535")
            return None
        return port, ""
    name = text.lower()  # IANA service names compare case-insensitively (Cilium lowercases them)
    if NAMED_PORT.match(name) and "--" not in name and any(c.isalpha() for c in name):
        return 0, name
    ctx.error(line, field, f"invalid port {raw!r}: a number 0-65535 or a port name")
    return None


def _end_port(entry, port: int, name: str, field, line, ctx: _Ctx) -> int | None:
    end = entry["endPort"]
    eline, efield = _ln(entry, "endPort", line), f"{field}.endPort"
    if not isinstance(end, int) or isinstance(end, bool) or not 0 <= end <= 65535:
        problem = f"invalid endPort {end!r}"
    elif name:
        problem = "endPort cannot be used with a named port"
    elif port == 0:
        problem = "endPort needs a non-zero port"
    elif end < port:
        problem = f"endPort {end} is below port {port}"
    else:
        return end
    ctx.error(eline, efield, problem)
    return None


# ---------------------------------------------------------------------------------------------
# toPorts


def _parse_to_ports(item, field, line, deny, direction, ctx: _Ctx) -> tuple[PortRule, ...] | None:
    """The toPorts list. Returns None when every entry had to be dropped fail-closed."""
    if "toPorts" not in item:
        return ()
    out = []
    dropped = 0
    for entry, pfield, pline in _items(ctx, item, "toPorts", field, line):
        rule, drop = _port_rule(entry, pfield, pline, deny, direction, ctx)
        dropped += drop
        if rule is not None:
            out.append(rule)
    if dropped and not out:
        return None
    return tuple(out)


def _port_rule(entry, pfield, pline, deny, direction, ctx: _Ctx) -> tuple[PortRule | None, bool]:
    """(the port rule or None, dropped fail-closed)."""
    if not isinstance(entry, dict):
        ctx.error(pline, pfield, "must be a mapping with ports (and rules)")
        return None, False
    _check_keys(ctx, entry, PORT_RULE_KEYS, pfield, pline)
    ports = _ports(entry, pfield, pline, ctx)
    _check_port_rule(entry, pfield, pline, direction, ctx)
    drop = _not_enforced(entry, pfield, pline, deny, ctx)
    l7 = None
    if entry.get("rules") is not None:
        if deny:
            _key_error(
                ctx, entry, "rules", pfield, pline, "L7 rules are not allowed in a deny rule"
            )
        else:
            l7, drop_l7 = _parse_l7(
                entry["rules"], f"{pfield}.rules", _ln(entry, "rules", pline), ctx
            )
            drop = drop or drop_l7
            if l7 is not None:
                ports = _l7_ports(ports, l7.parser, pfield, pline, entry, ctx)
                if ports is None:
                    return None, False
    if drop:
        return None, True
    return PortRule(tuple(ports), l7), False


def _ports(entry, pfield, pline, ctx: _Ctx) -> list[PortProto]:
    plist = _as_list(ctx, entry.get("ports"), f"{pfield}.ports", _ln(entry, "ports", pline))
    if len(plist) > MAX_PORTS:
        _key_error(
            ctx,
            entry,
            "ports",
            pfield,
            pline,
            f"{len(plist)} ports; at most {MAX_PORTS} in one toPorts entry (as in Cilium)",
        )
        return []
    out = []
    for p, field, line in _items(ctx, entry, "ports", pfield, pline):
        pp = _parse_port(p, field, line, ctx)
        if pp is not None:
            out.append(pp)
    return out


def _check_port_rule(entry, pfield, pline, direction, ctx: _Ctx) -> None:
    """What Cilium's sanitizer refuses in one toPorts entry."""
    rules = entry.get("rules")
    has_l7 = isinstance(rules, dict) and any(rules.get(k) for k in rules)
    if isinstance(rules, dict) and rules.get("dns"):
        if direction == "in":
            ctx.error(
                _ln(rules, "dns", pline),
                f"{pfield}.rules.dns",
                "DNS rules are not allowed on ingress",
            )
        elif not entry.get("ports"):
            ctx.error(_ln(rules, "dns", pline), f"{pfield}.ports", "DNS rules need their port (53)")
    names = entry.get("serverNames")
    if isinstance(names, list):
        if any(n in (None, "") for n in names):
            _key_error(
                ctx, entry, "serverNames", pfield, pline, "an empty server name is not allowed"
            )
        if names and has_l7 and "terminatingTLS" not in entry:
            _key_error(
                ctx,
                entry,
                "serverNames",
                pfield,
                pline,
                "serverNames with L7 rules need terminatingTLS",
            )
    if "listener" in entry and (direction == "in" or has_l7):
        _key_error(
            ctx,
            entry,
            "listener",
            pfield,
            pline,
            "a listener is not allowed on ingress"
            if direction == "in"
            else "a listener is not allowed together with L7 rules",
        )


def _not_enforced(entry, pfield, pline, deny, ctx: _Ctx) -> bool:
    """TLS and listener settings: the port rule is dropped (warning; error in a deny rule)."""
    found = [
        _unenforced(
            ctx,
            entry,
            key,
            pfield,
            pline,
            deny,
            error=f"{key} is not allowed in a deny rule",
            warning=f"{what} is not enforced: this port rule is dropped, so these ports are not "
            "allowed by it",
        )
        for key, what in NOT_ENFORCED
    ]
    return any(found)


# ---------------------------------------------------------------------------------------------
# ICMP


def _parse_icmps(item, field, line, ctx: _Ctx) -> list[ICMPField]:
    out = []
    for entry, efield, eline in _items(ctx, item, "icmps", field, line):
        fields = (entry or {}).get("fields") if isinstance(entry, dict) else None
        fields = _as_list(ctx, fields, f"{efield}.fields", eline)
        if len(fields) > MAX_ICMP_FIELDS:
            ctx.error(
                eline,
                f"{efield}.fields",
                f"{len(fields)} fields; at most {MAX_ICMP_FIELDS} (as in Cilium)",
            )
            continue
        for j, f in enumerate(fields):
            parsed = _icmp_field(f, f"{efield}.fields[{j}]", _ln(fields, j, eline), ctx)
            if parsed is not None:
                out.append(parsed)
    return out


def _icmp_field(f, ffield, fline, ctx: _Ctx) -> ICMPField | None:
    if not isinstance(f, dict) or "type" not in f:
        ctx.error(fline, ffield, "needs type (and family)")
        return None
    family = str(f.get("family") or "IPv4")
    if family not in ("IPv4", "IPv6"):
        _key_error(
            ctx, f, "family", ffield, fline, f"unknown family {family!r}; expected IPv4 or IPv6"
        )
        return None
    number = icmp.icmp_type(family, f["type"])
    if number is None:
        _key_error(ctx, f, "type", ffield, fline, f"unknown {family} ICMP type {f['type']!r}")
        return None
    return ICMPField(family, number)
