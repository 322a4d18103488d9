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
from policies.parse_common import _as_list, _Ctx, _ln
from policies.parse_l7 import _l7_ports, _parse_l7

NAMED_PORT = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


def _parse_cidrs(item, prefix, field, line, ctx: _Ctx) -> list[CIDRRule]:
    out = []
    key = f"{prefix}CIDR"
    node = _as_list(ctx, item.get(key), f"{field}.{key}", _ln(item, key, line))
    for i, text in enumerate(node):
        net = _network(text, f"{field}.{key}[{i}]", _ln(node, i, line), ctx)
        if net is not None:
            out.append(CIDRRule(net))
    key = f"{prefix}CIDRSet"
    node = _as_list(ctx, item.get(key), f"{field}.{key}", _ln(item, key, line))
    for i, entry in enumerate(node):
        efield, eline = f"{field}.{key}[{i}]", _ln(node, i, line)
        if not isinstance(entry, dict):
            ctx.error(eline, efield, "must be a mapping with cidr (and except)")
            continue
        if "cidr" not in entry:
            for other in ("cidrGroupRef", "cidrGroupSelector"):
                if other in entry:
                    ctx.warn(
                        _ln(entry, other, eline),
                        f"{efield}.{other}",
                        f"{other} is not enforced: CiliumCIDRGroup objects are not loaded, so "
                        "this entry allows nothing",
                    )
                    break
            else:
                ctx.error(eline, f"{efield}.cidr", "is required")
            continue
        net = _network(entry["cidr"], f"{efield}.cidr", _ln(entry, "cidr", eline), ctx)
        if net is None:
            continue
        excepts = []
        ex_node = _as_list(
            ctx, entry.get("except"), f"{efield}.except", _ln(entry, "except", eline)
        )
        for j, ex in enumerate(ex_node):
            exnet = _network(ex, f"{efield}.except[{j}]", _ln(ex_node, j, eline), ctx)
            if exnet is None:
                continue
            if exnet.version != net.version or not exnet.subnet_of(net):
                ctx.error(
                    _ln(ex_node, j, eline), f"{efield}.except[{j}]", f"{exnet} is not inside {net}"
                )
                continue
            excepts.append(exnet)
        out.append(CIDRRule(net, tuple(excepts)))
    return out


def _network(text, field, line, ctx: _Ctx):
    try:
        if "/" not in str(text):
            addr = ipaddress.ip_address(str(text))
            return ipaddress.ip_network(f"{addr}/{addr.max_prefixlen}")
        return ipaddress.ip_network(str(text), strict=False)
    except ValueError:
        ctx.error(line, field, f"invalid CIDR {text!r}")
        return None


def _parse_port(entry, field, line, ctx: _Ctx) -> PortProto | None:
    if not isinstance(entry, dict):
        ctx.error(line, field, "must be a mapping with port and protocol")
        return None
    for key in entry:
        if key not in ("port", "endPort", "protocol"):
            ctx.error(_ln(entry, key, line), f"{field}.{key}", "unknown field")
    proto_text = str(entry.get("protocol") or "ANY").upper()
    if proto_text not in PROTO_NUMBERS:
        ctx.error(
            _ln(entry, "protocol", line),
            f"{field}.protocol",
            f"unknown protocol {entry.get('protocol')!r}; expected TCP, UDP, SCTP or ANY",
        )
        return None
    proto = PROTO_NUMBERS[proto_text]
    raw = entry.get("port", "0")
    text = str(raw if raw is not None else "0").strip()
    name = ""
    if text.isdigit():
        port = int(text)
        if port > 65535:
            ctx.error(
                _ln(entry, "port", line), f"{field}.port", f"port {port} is out of range 0-65535"
            )
            return None
    elif NAMED_PORT.match(text) and any(c.isalpha() for c in text):
        port, name = 0, text
    else:
        ctx.error(
            _ln(entry, "port", line),
            f"{field}.port",
            f"invalid port {raw!r}: a number 0-65535 or a port name",
        )
        return None
    end = entry.get("endPort")
    end_port = port
    if end is not None:
        if not isinstance(end, int) or isinstance(end, bool) or not 0 <= end <= 65535:
            ctx.error(_ln(entry, "endPort", line), f"{field}.endPort", f"invalid endPort {end!r}")
            return None
        if name:
            ctx.error(
                _ln(entry, "endPort", line),
                f"{field}.endPort",
                "endPort cannot be used with a named port",
            )
            return None
        if port == 0:
            ctx.error(
                _ln(entry, "endPort", line), f"{field}.endPort", "endPort needs a non-zero port"
            )
            return None
        if end < port:
            ctx.error(
                _ln(entry, "endPort", line),
                f"{field}.endPort",
                f"endPort {end} is below port {port}",
            )
            return None
        end_port = end
    return PortProto(port, end_port if port else 0, proto, name)


def _parse_to_ports(item, field, line, deny, ctx: _Ctx) -> tuple[PortRule, ...] | None:
    """The toPorts list. Returns None when every entry had to be dropped fail-closed."""
    if "toPorts" not in item:
        return ()
    node = _as_list(ctx, item["toPorts"], f"{field}.toPorts", _ln(item, "toPorts", line))
    out = []
    dropped = 0
    for i, entry in enumerate(node):
        pfield, pline = f"{field}.toPorts[{i}]", _ln(node, i, line)
        if not isinstance(entry, dict):
            ctx.error(pline, pfield, "must be a mapping with ports (and rules)")
            continue
        for key in entry:
            if key not in (
                "ports",
                "rules",
                "terminatingTLS",
                "originatingTLS",
                "serverNames",
                "listener",
            ):
                ctx.error(_ln(entry, key, pline), f"{pfield}.{key}", "unknown field")
        ports = []
        plist = _as_list(ctx, entry.get("ports"), f"{pfield}.ports", _ln(entry, "ports", pline))
        for j, p in enumerate(plist):
            pp = _parse_port(p, f"{pfield}.ports[{j}]", _ln(plist, j, pline), ctx)
            if pp is not None:
                ports.append(pp)
        drop = False
        for key, what in (
            ("terminatingTLS", "TLS termination"),
            ("originatingTLS", "TLS origination"),
            ("serverNames", "the TLS server-name (SNI) restriction"),
            ("listener", "the custom Envoy listener"),
        ):
            if key in entry:
                if deny:
                    ctx.error(
                        _ln(entry, key, pline),
                        f"{pfield}.{key}",
                        f"{key} is not allowed in a deny rule",
                    )
                else:
                    ctx.warn(
                        _ln(entry, key, pline),
                        f"{pfield}.{key}",
                        f"{what} is not enforced: this port rule is dropped, so these ports are "
                        "not allowed by it",
                    )
                drop = True
        l7 = None
        if "rules" in entry and entry["rules"] is not None:
            if deny:
                ctx.error(
                    _ln(entry, "rules", pline),
                    f"{pfield}.rules",
                    "L7 rules are not allowed in a deny rule",
                )
            else:
                l7, drop_l7 = _parse_l7(
                    entry["rules"], f"{pfield}.rules", _ln(entry, "rules", pline), ctx
                )
                drop = drop or drop_l7
                if l7 is not None:
                    ports = _l7_ports(ports, l7.parser, pfield, pline, entry, ctx)
                    if ports is None:
                        continue
        if drop:
            dropped += 1
            continue
        out.append(PortRule(tuple(ports), l7))
    if dropped and not out:
        return None
    return tuple(out)


def _parse_icmps(item, field, line, ctx: _Ctx) -> list[ICMPField]:
    out = []
    node = _as_list(ctx, item.get("icmps"), f"{field}.icmps", _ln(item, "icmps", line))
    for i, entry in enumerate(node):
        efield, eline = f"{field}.icmps[{i}]", _ln(node, i, line)
        fields = _as_list(
            ctx,
            (entry or {}).get("fields") if isinstance(entry, dict) else None,
            f"{efield}.fields",
            eline,
        )
        for j, f in enumerate(fields):
            ffield, fline = f"{efield}.fields[{j}]", _ln(fields, j, eline)
            if not isinstance(f, dict) or "type" not in f:
                ctx.error(fline, ffield, "needs type (and family)")
                continue
            family = str(f.get("family") or "IPv4")
            if family not in ("IPv4", "IPv6"):
                ctx.error(
                    _ln(f, "family", fline),
                    f"{ffield}.family",
                    f"unknown family {family!r}; expected IPv4 or IPv6",
                )
                continue
            number = icmp.icmp_type(family, f["type"])
            if number is None:
                ctx.error(
                    _ln(f, "type", fline),
                    f"{ffield}.type",
                    f"unknown {family} ICMP type {f['type']!r}",
                )
                continue
            out.append(ICMPField(family, number))
    return out
