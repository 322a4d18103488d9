"""The gateway's broker map: one Kafka listener per broker, advertised in place of the broker."""

from __future__ import annotations

from l7proxy.config import HostPort, ListenerConfig, ProxyConfig
from l7proxy.kafka import settings


def test_one_listener_per_broker():
    listeners = [
        ListenerConfig(HostPort("10.0.0.5", 19092), HostPort("kafka-0", 9092), "kafka"),
        ListenerConfig(HostPort("0.0.0.0", 19093), HostPort("kafka-1", 9092), "auto"),
        ListenerConfig(HostPort("0.0.0.0", 8080), HostPort("web", 80), "http"),
    ]
    assert settings.gateway_broker_map(listeners) == {
        ("kafka-0", 9092): ("10.0.0.5", 19092),
        ("kafka-1", 9092): ("127.0.0.1", 19093),  # wildcard listener: the advertise host
    }
    assert settings.gateway_broker_map(listeners[1:2], advertise_host="gw.example")[
        ("kafka-1", 9092)
    ] == ("gw.example", 19093)


def test_settings_follow_the_proxy_config_and_the_installed_map():
    class Ctx:
        config = ProxyConfig(max_frame_bytes=1234)

    try:
        settings.set_broker_map({("b", 1): ("g", 2)})
        got = settings.settings_for(Ctx())
        assert got.max_frame_size == 1234 and got.brokers == {("b", 1): ("g", 2)}
        assert got.write_high_water >= 4 * 1024 * 1024
    finally:
        settings.set_broker_map({})
    assert settings.settings_for(Ctx()).brokers is None  # transparent modes: no rewriting
