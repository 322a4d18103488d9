"""The Kafka layer's settings per connection, and the gateway's broker-address map.

In gateway mode every Kafka listener fronts one broker (`--listen L --upstream B`, or several
`listeners:` in the YAML config). Responses that name broker B (Metadata, FindCoordinator,
DescribeCluster) are rewritten to advertise L, so a client that bootstrapped through the gateway
never connects around it. The gateway builds the map with `gateway_broker_map` and puts it in
its config (`ProxyConfig.kafka.brokers`, l7proxy/gateway.py); the transparent modes have none
and pass addresses through.
"""

from __future__ import annotations

from collections.abc import Iterable

from l7proxy.kafka.commands import KafkaSettings

Address = tuple[str, int]
_WILDCARDS = ("0.0.0.0", "::", "")


def gateway_broker_map(listeners: Iterable, advertise_host: str | None = None) -> dict:
    """{upstream broker address: gateway address to advertise} for the Kafka listeners.

    A listener bound to a wildcard address advertises `advertise_host` (default 127.0.0.1).
    """
    out: dict[Address, Address] = {}
    for lst in listeners:
        if getattr(lst, "protocol", "kafka") not in ("kafka", "auto"):
            continue
        host = lst.listen.host
        if host in _WILDCARDS:
            host = advertise_host or "127.0.0.1"
        out[(lst.upstream.host, lst.upstream.port)] = (host, lst.listen.port)
    return out


def settings_for(ctx) -> KafkaSettings:
    """The layer's settings for a connection of `ctx` (buffer sizes: ctx.config.kafka)."""
    return KafkaSettings(
        max_frame_size=ctx.config.max_frame_bytes,
        max_request_elements=ctx.config.kafka.max_request_elements,
        brokers=dict(ctx.config.kafka.brokers) or None,
    )
