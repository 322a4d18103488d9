"""Named ports of endpoints: `--port NAME=NUMBER[/PROTO]`, their validation, and the table the
policy compiler resolves `toPorts: [{port: NAME}]` with.

A name follows Kubernetes' IANA_SVC_NAME rules (what a container port's `name` may be), so a
policy written for a cluster resolves the same way here. The protocol is recorded and shown like
a container port's; the compiler's table maps a name to a number only, so the rule's own
`protocol` decides which protocols are allowed on the resolved number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MAX_NAME = 15
PROTOCOLS = ("TCP", "UDP", "SCTP")
_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


@dataclass(frozen=True, slots=True)
class NamedPort:
    name: str
    port: int
    protocol: str = "TCP"

    def __str__(self) -> str:
        return f"{self.name}={self.port}/{self.protocol}"

    def to_json(self) -> dict:
        return {"name": self.name, "port": self.port, "protocol": self.protocol}


def check_name(name: str) -> None:
    """Raise ValueError unless `name` is a valid IANA_SVC_NAME."""
    why = None
    if not name:
        why = "it is empty"
    elif len(name) > MAX_NAME:
        why = f"it is longer than {MAX_NAME} characters"
    elif not set(name) <= _NAME_CHARS:
        why = "only lowercase letters, digits and '-' are allowed"
    elif not any("a" <= ch <= "z" for ch in name):
        why = "it needs at least one letter"
    elif name[0] == "-" or name[-1] == "-":
        why = "it must not begin or end with '-'"
    elif "--" in name:
        why = "it must not contain '--'"
    if why:
        raise ValueError(f"bad port name {name!r}: {why}")


def check_number(text: str | int, name: str) -> int:
    try:
        number = int(text)
    except (TypeError, ValueError):
        number = 0
    if isinstance(text, bool) or not 1 <= number <= 65535:
        raise ValueError(f"bad port number {text!r} for {name!r}: must be 1-65535")
    return number


def check_protocol(text: str, name: str) -> str:
    proto = text.upper()
    if proto not in PROTOCOLS:
        raise ValueError(
            f"bad protocol {text!r} for {name!r}: must be one of {', '.join(PROTOCOLS)}"
        )
    return proto


def parse(spec: str) -> NamedPort:
    """`web=8080`, `web=8080/tcp`, `dns=53/UDP` -> NamedPort; ValueError naming the bad part."""
    name, sep, rest = spec.partition("=")
    if not sep:
        raise ValueError(f"bad port {spec!r}: expected NAME=NUMBER[/PROTO]")
    check_name(name)
    number, _, proto = rest.partition("/")
    return NamedPort(name, check_number(number, name), check_protocol(proto or "TCP", name))


def from_json(items) -> tuple[NamedPort, ...]:
    """The API's `ports` argument (dicts or NAME=NUMBER[/PROTO] strings), validated, sorted.

    Raises ValueError for a bad entry or a name given twice."""
    out: dict[str, NamedPort] = {}
    for item in items or ():
        if isinstance(item, str):
            port = parse(item)
        elif isinstance(item, Mapping):
            name = str(item.get("name") or "")
            check_name(name)
            port = NamedPort(
                name,
                check_number(item.get("port"), name),
                check_protocol(str(item.get("protocol") or "TCP"), name),
            )
        else:
            raise ValueError(f"bad port {item!r}: expected NAME=NUMBER[/PROTO]")
        if port.name in out:
            raise ValueError(f"port name {port.name!r} given twice")
        out[port.name] = port
    return tuple(sorted(out.values(), key=lambda p: p.name))


def table(endpoints: Iterable[tuple[str, Iterable[NamedPort]]]) -> dict[str, dict[str, int]]:
    """`compile_policy(named_ports=...)`: {endpoint name: {port name: number}}, keyed like the
    compiler's `endpoints` mapping. Endpoints without named ports are left out."""
    out: dict[str, dict[str, int]] = {}
    for name, ports in endpoints:
        named = {p.name: p.port for p in ports}
        if named:
            out[name] = named
    return out
