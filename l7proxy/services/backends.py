"""Which backends a service has right now: its static list, or the endpoints its selector picks.

Pure: the agent hands in the endpoints it knows (local ones by name, other nodes' pods from the
cluster's ipcache with their identity's labels), so every node that knows the same endpoints
computes the same list, in the same order (sorted by address), which is what Maglev needs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from l7proxy.services.model import Backend, Service

NAMESPACE_KEY = "io.kubernetes.pod.namespace"


@dataclass(frozen=True, slots=True)
class KnownEndpoint:
    name: str  # local endpoint name, or "" for another node's pod
    ip: str
    labels: tuple[str, ...]  # "source:key=value" strings as the agent stores them
    terminating: bool = False  # a local endpoint in its deletion grace period


def label_map(labels: Iterable[str]) -> dict[str, str]:
    """`k8s:app=web` -> {"app": "web"} (the source is ignored, as Kubernetes selectors do)."""
    out = {}
    for label in labels:
        source_key, _, value = label.partition("=")
        _, colon, key = source_key.partition(":")
        out[key if colon else source_key] = value
    return out


def selects(service: Service, labels: Iterable[str]) -> bool:
    have = label_map(labels)
    if have.get(NAMESPACE_KEY, "default") != service.namespace:
        return False
    return all(have.get(k) == v for k, v in service.selector)


def resolve(service: Service, endpoints: Iterable[KnownEndpoint]) -> tuple[Backend, ...]:
    if not service.selector:
        return service.backends
    chosen = {
        ep.ip: Backend(ep.ip, service.target_port, ep.name, ep.terminating)
        for ep in endpoints
        if selects(service, ep.labels)
    }
    return tuple(sorted(chosen.values(), key=lambda b: _ip_order(b.ip)))


def serving(backends: tuple[Backend, ...]) -> tuple[Backend, ...]:
    """The backends that take new flows: the ones not terminating, or, when every one is
    terminating, all of them (Kubernetes' "proxy terminating endpoints" fallback, which Cilium
    follows too: a service whose pods are all being replaced keeps answering)."""
    ready = tuple(b for b in backends if not b.terminating)
    return ready or backends


def _ip_order(ip: str) -> tuple[int, ...]:
    return tuple(int(p) for p in ip.split("."))
