"""The gateway's broker map: one Kafka listener per broker, advertised in place of the broker."""

from __future__ import annotations

import pytest

from l7proxy.config import HostPort, KafkaConfig, ListenerConfig, ProxyConfig, load_yaml
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


def test_settings_follow_the_proxy_config():
    class Ctx:
        config = ProxyConfig(
            max_frame_bytes=1234, kafka=KafkaConfig(brokers=((("b", 1), ("g", 2)),))
        )

    got = settings.settings_for(Ctx())
    assert got.max_frame_size == 1234 and got.brokers == {("b", 1): ("g", 2)}
    Ctx.config = ProxyConfig()
    assert settings.settings_for(Ctx()).brokers is None  # transparent modes: no rewriting


def test_a_broker_map_from_a_config_file_becomes_pairs(tmp_path):
    path = tmp_path / "gw.yaml"
    path.write_text("limits: {kafka: {brokers: [[[kafka-0, 9092], [gw, 19092]]]}}\n")
    kafka = ProxyConfig(**load_yaml(path)["limits"]).kafka
    assert kafka.brokers == ((("kafka-0", 9092), ("gw", 19092)),)
    assert dict(kafka.brokers) == {("kafka-0", 9092): ("gw", 19092)}


def test_kafka_buffer_sizes_are_their_own_config_not_a_raised_copy_of_the_http_marks(tmp_path):
    """Kafka's write marks and socket buffers are ProxyConfig.kafka (KafkaConfig), explicit and
    settable in a config file; the HTTP marks no longer feed them."""
    cfg = ProxyConfig(write_high_water=8 * 1024 * 1024)
    assert cfg.kafka == KafkaConfig()
    assert (cfg.kafka.write_high_water, cfg.kafka.write_low_water) == (4 << 20, 1 << 20)
    assert cfg.kafka.socket_buffer == 512 * 1024
    path = tmp_path / "gw.yaml"
    path.write_text("limits: {kafka: {write_high_water: 2097152, socket_buffer: 0}}\n")
    limits = load_yaml(path)["limits"]
    assert ProxyConfig(**limits).kafka == KafkaConfig(write_high_water=2 << 20, socket_buffer=0)
    path.write_text("limits: {kafka: {write_hgh_water: 1}}\n")
    with pytest.raises(ValueError, match="unknown kafka limits"):
        load_yaml(path)
    with pytest.raises(ValueError):
        KafkaConfig(write_high_water=1024, write_low_water=4096)


def test_the_request_element_bound_is_a_proxy_config_limit(tmp_path):
    """max_request_elements lives in ProxyConfig.kafka like the other limits and reaches the
    layer's settings; a config file may set it, and it must be positive."""
    path = tmp_path / "gw.yaml"
    path.write_text("limits: {kafka: {max_request_elements: 500}}\n")

    class Ctx:
        config = ProxyConfig(**load_yaml(path)["limits"])

    assert settings.settings_for(Ctx()).max_request_elements == 500
    Ctx.config = ProxyConfig()
    assert settings.settings_for(Ctx()).max_request_elements == 100_000
    with pytest.raises(ValueError, match="max_request_elements"):
        KafkaConfig(max_request_elements=0)
