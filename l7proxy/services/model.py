"""The Service record: what `service create` stores and every node enforces.

Field names follow Kubernetes' Service where one exists (selector, targetPort, nodePort,
sessionAffinity + timeoutSeconds). Parsing and validation live here, pure, so the CLI, the agent
and the etcd watch reject the same inputs with the same one-line messages.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

PROTOCOLS = ("TCP", "UDP")
ALGORITHMS = ("random", "maglev")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")  # a DNS-1123 label-ish name
LABEL_KEY_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_./:-]{0,250}[A-Za-z0-9])?$")
NODE_PORT_RANGE = (30000, 32767)  # Kubernetes' default service-node-port-range
DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds, Kubernetes' default for ClientIP affinity
MAX_AFFINITY_TIMEOUT = 86400
MAX_BACKENDS = 256  # fixed --backend addresses per service (a selector may pick more)


class ServiceError(ValueError):
    """One line that says what is wrong and what to do."""


@dataclass(frozen=True, slots=True)
class Backend:
    ip: str
    port: int
    endpoint: str = ""  # the endpoint's name when a selector chose it ("" for --backend)
    # Kubernetes' EndpointSlice condition: the endpoint is being deleted (a grace period runs).
    # It gets no new flow while the service has a serving backend; its connections go on.
    terminating: bool = False

    @property
    def key(self) -> str:
        """The name Maglev hashes: the same on every node for the same backend."""
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    vip: str
    port: int
    protocol: str  # "TCP" | "UDP"
    selector: tuple[tuple[str, str], ...] = ()  # sorted (key, value) pairs
    target_port: int = 0
    backends: tuple[Backend, ...] = ()  # static backends (no selector)
    node_port: int = 0
    affinity_timeout: int = 0  # seconds; 0 = no session affinity
    dsr: bool = False
    algorithm: str = "random"
    namespace: str = "default"
    created: float = 0.0

    @property
    def frontend(self) -> str:
        return f"{self.vip}:{self.port}/{self.protocol}"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "namespace": self.namespace,
            "vip": self.vip,
            "port": self.port,
            "protocol": self.protocol,
            "selector": dict(self.selector),
            "targetPort": self.target_port,
            "backends": [f"{b.ip}:{b.port}" for b in self.backends],
            "nodePort": self.node_port,
            "sessionAffinity": "ClientIP" if self.affinity_timeout else "None",
            "affinityTimeoutSeconds": self.affinity_timeout,
            "dsr": self.dsr,
            "algorithm": self.algorithm,
            "created": self.created,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, obj: dict) -> Service:
        """The stored form back; validated again (an etcd value may come from anyone)."""
        try:
            return build(
                name=obj["name"],
                vip=f"{obj['vip']}:{obj['port']}/{obj['protocol']}",
                selector=",".join(f"{k}={v}" for k, v in (obj.get("selector") or {}).items()),
                target_port=int(obj.get("targetPort") or 0),
                backends=list(obj.get("backends") or []),
                node_port=int(obj.get("nodePort") or 0),
                affinity="client-ip" if obj.get("sessionAffinity") == "ClientIP" else "none",
                affinity_timeout=int(obj.get("affinityTimeoutSeconds") or 0) or None,
                dsr=bool(obj.get("dsr")),
                algorithm=str(obj.get("algorithm") or "random"),
                namespace=str(obj.get("namespace") or "default"),
                created=float(obj.get("created") or 0.0),
            )
        except (KeyError, TypeError) as exc:
            raise ServiceError(f"service record is missing or mistypes a field: {exc}") from None

    @classmethod
    def loads(cls, text: str) -> Service:
        try:
            return cls.from_json(json.loads(text))
        except ValueError as exc:
            raise ServiceError(str(exc)) from None


def parse_frontend(text: str) -> tuple[str, int, str]:
    """`10.96.0.10:80/TCP` -> ("10.96.0.10", 80, "TCP"); the protocol defaults to TCP."""
    addr, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if proto not in PROTOCOLS:
        raise ServiceError(f"--vip {text}: protocol must be TCP or UDP (e.g. 10.96.0.10:80/TCP)")
    ip, port = _ip_port(addr, f"--vip {text}")
    if ipaddress.ip_address(ip).is_unspecified or ipaddress.ip_address(ip).is_loopback:
        raise ServiceError(f"--vip {text}: the VIP must be a routable IPv4 address, not {ip}")
    return ip, port, proto


def parse_backend(text: str) -> Backend:
    ip, port = _ip_port(text, f"--backend {text}")
    return Backend(ip, port)


def parse_selector(text: str) -> tuple[tuple[str, str], ...]:
    """`app=web,tier=front` -> sorted pairs; an optional `k8s:` source is dropped (endpoints'
    labels are matched by key and value)."""
    out = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        key, eq, value = item.partition("=")
        key = key.removeprefix("k8s:")
        if not eq or not LABEL_KEY_RE.match(key) or "," in value:
            raise ServiceError(f"--selector {text}: {item!r} is not key=value (e.g. app=web)")
        out[key] = value
    if not out and text.strip():
        raise ServiceError(f"--selector {text}: give at least one key=value")
    return tuple(sorted(out.items()))


def build(
    *,
    name: str,
    vip: str,
    selector: str = "",
    target_port: int | None = None,
    backends: list[str] | None = None,
    node_port: int | None = None,
    affinity: str = "none",
    affinity_timeout: int | None = None,
    dsr: bool = False,
    algorithm: str = "random",
    namespace: str = "default",
    created: float = 0.0,
) -> Service:
    """Check every field of a service given as CLI-style strings; raises ServiceError."""
    if not NAME_RE.match(name or ""):
        raise ServiceError(
            f"service name {name!r}: use lower-case letters, digits, '-' and '.' (max 63)"
        )
    ip, port, proto = parse_frontend(vip)
    sel = parse_selector(selector or "")
    statics = tuple(parse_backend(b) for b in backends or ())
    if sel and statics:
        raise ServiceError("give either --selector (with --target-port) or --backend, not both")
    if not sel and not statics:
        raise ServiceError("a service needs --selector k=v --target-port P or --backend IP:PORT")
    tport = int(target_port or 0)
    if sel:
        if not tport:
            tport = port  # Kubernetes: targetPort defaults to port
        _check_port(tport, "--target-port")
    elif tport:
        raise ServiceError("--target-port goes with --selector; --backend names its own port")
    if len(set(statics)) != len(statics):
        raise ServiceError("a --backend is given twice")
    if len(statics) > MAX_BACKENDS:
        raise ServiceError(f"at most {MAX_BACKENDS} backends per service")
    nport = int(node_port or 0)
    if nport and not NODE_PORT_RANGE[0] <= nport <= NODE_PORT_RANGE[1]:
        raise ServiceError(
            f"--node-port {nport}: use a port in {NODE_PORT_RANGE[0]}-{NODE_PORT_RANGE[1]}"
        )
    affinity = (affinity or "none").lower()
    if affinity in ("clientip", "client-ip"):
        timeout = DEFAULT_AFFINITY_TIMEOUT if affinity_timeout is None else int(affinity_timeout)
        if not 1 <= timeout <= MAX_AFFINITY_TIMEOUT:
            raise ServiceError(
                f"--affinity-timeout {timeout}: give 1-{MAX_AFFINITY_TIMEOUT} seconds"
            )
    elif affinity == "none":
        if affinity_timeout:
            raise ServiceError("--affinity-timeout needs --affinity client-ip")
        timeout = 0
    else:
        raise ServiceError(f"--affinity {affinity}: use client-ip or none")
    if algorithm not in ALGORITHMS:
        raise ServiceError(f"--lb {algorithm}: use maglev or random")
    if not NAME_RE.match(namespace or ""):
        raise ServiceError(f"namespace {namespace!r} is not a valid name")
    return Service(
        name=name,
        vip=ip,
        port=port,
        protocol=proto,
        selector=sel,
        target_port=tport if sel else 0,
        backends=tuple(sorted(statics, key=lambda b: (b.ip, b.port))),
        node_port=nport,
        affinity_timeout=timeout,
        dsr=bool(dsr),
        algorithm=algorithm,
        namespace=namespace,
        created=created,
    )


def _ip_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ServiceError(f"{what}: write IPv4:PORT (e.g. 10.96.0.10:80)")
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise ServiceError(f"{what}: {host!r} is not an IPv4 address") from None
    port = int(port_text)
    _check_port(port, what)
    return str(ip), port


def _check_port(port: int, what: str) -> None:
    if not 1 <= port <= 65535:
        raise ServiceError(f"{what}: port {port} is outside 1-65535")
