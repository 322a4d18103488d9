"""What a protocol session knows about its connection: `ConnContext`.

The upstream address comes through the `OriginalDestination` seam: in gateway mode it is fixed by
config (`StaticDestination`); the transparent modes (l7proxy/platform.py, datapath owner) resolve
it from the accepted socket (SO_ORIGINAL_DST / IP_TRANSPARENT local address) or a BPF map.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from l7proxy.config import ProxyConfig
from l7proxy.flows import FlowSink, build_flow, endpoint
from l7proxy.metrics import ProtoMetrics, ProxyMetrics


@dataclass(frozen=True, slots=True)
class OriginalDestination:
    """Where the client meant to connect: the address the proxy opens upstream."""

    host: str
    port: int


class DestinationResolver(Protocol):
    def __call__(self, transport) -> OriginalDestination: ...


class StaticDestination:
    """Gateway mode: every connection of a listener goes to one configured upstream."""

    __slots__ = ("destination",)

    def __init__(self, host: str, port: int) -> None:
        self.destination = OriginalDestination(host, port)

    def __call__(self, transport) -> OriginalDestination:
        return self.destination


class ConnContext:
    """One accepted client connection. Sessions call `rules()` per request, so a policy reload
    applies to the next request without touching open connections."""

    __slots__ = (
        "config",
        "client_ip",
        "client_port",
        "listener_port",
        "destination",
        "source_identity",
        "source_labels",
        "destination_identity",
        "destination_labels",
        "rules",
        "flows",
        "metrics",
        "proto_metrics",
        "direction",
        "upstreams",
        "sweeper",
        "_source_dict",
        "_destination_dict",
    )

    def __init__(
        self,
        *,
        config: ProxyConfig,
        client: tuple[str, int],
        listener_port: int,
        destination: OriginalDestination,
        source_identity: int,
        source_labels: tuple[str, ...],
        destination_identity: int,
        destination_labels: tuple[str, ...],
        rules: Callable[[], Any],
        flows: FlowSink,
        metrics: ProxyMetrics,
        proto: str = "http",
        direction: str = "INGRESS",
        upstreams: Any = None,
        sweeper: Any = None,
    ) -> None:
        self.config = config
        self.client_ip, self.client_port = client[0], client[1]
        self.listener_port = listener_port
        self.destination = destination
        self.source_identity = source_identity
        self.source_labels = tuple(source_labels)
        self.destination_identity = destination_identity
        self.destination_labels = tuple(destination_labels)
        self.rules = rules
        self.flows = flows
        self.metrics = metrics
        self.proto_metrics: ProtoMetrics = metrics.for_proto(proto)
        self.direction = direction
        # What the worker's sessions share upstream (l7proxy.protocols.worker_upstreams) or None.
        self.upstreams = upstreams
        # The worker's DeadlineSweeper (l7proxy.server) or None: every session adds itself and
        # keeps the contract of l7proxy/session.py (deadline, on_deadline, drain, close).
        self.sweeper = sweeper
        self._source_dict = None
        self._destination_dict = None

    def for_proto(self, proto: str) -> ConnContext:
        """Re-bind the per-protocol metrics after sniffing picked a protocol."""
        self.proto_metrics = self.metrics.for_proto(proto)
        return self

    @property
    def has_peers(self) -> bool:
        """Whether a flow of this connection was built already (`peers` made its dicts)."""
        return self._source_dict is not None

    def peers(self) -> tuple[dict, dict]:
        """The flow's source and destination dicts: built once, shared by every flow of this
        connection (the agent enriches them once)."""
        if self._source_dict is None:
            self._source_dict = endpoint(self.source_identity, self.source_labels, self.client_ip)
            self._destination_dict = endpoint(
                self.destination_identity, self.destination_labels, self.destination.host
            )
        return self._source_dict, self._destination_dict

    def flow(
        self,
        verdict: str,
        l7: dict | None,
        summary: str,
        drop_reason: str | None = None,
        event_type: str = "L7",
    ) -> dict:
        """A Hubble-shaped flow for this connection (source = client, destination = upstream)."""
        source, destination = self.peers()
        return build_flow(
            verdict=verdict,
            source=source,
            destination=destination,
            source_port=self.client_port,
            destination_port=self.listener_port,
            l7=l7,
            summary=summary,
            direction=self.direction,
            drop_reason=drop_reason,
            event_type=event_type,
        )
