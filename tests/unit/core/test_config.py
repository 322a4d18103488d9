"""The gateway's config: flags, `-c CONFIG.yaml`, and what reaches the workers."""

from __future__ import annotations

import socket

from l7proxy.cli import build_parser
from l7proxy.commands.gateway import build_config
from l7proxy.gateway import with_kafka_broker_map


def gateway_config(*argv: str):
    return build_config(build_parser().parse_args(["gateway", *argv]))


BASE = ("--policy", "p.yaml", "--labels", "app=kafka", "--protocol", "kafka")


def test_broker_map_is_built_from_bound_ports_and_advertise_host(tmp_path):
    cfg = gateway_config("--listen", "0.0.0.0:0", "--upstream", "10.0.0.6:9092", *BASE)
    assert cfg.advertise_host is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        # A listener asking for port 0 advertises the port it was given, on 127.0.0.1.
        assert with_kafka_broker_map(cfg, [sock]).proxy.kafka.brokers == (
            (("10.0.0.6", 9092), ("127.0.0.1", port)),
        )
        conf = tmp_path / "gw.yaml"
        conf.write_text("advertise_host: gw.example\n")
        cfg = gateway_config("-c", str(conf), "--listen", "0.0.0.0:0", "--upstream",
                             "10.0.0.6:9092", *BASE)  # fmt: skip
        assert cfg.advertise_host == "gw.example"
        assert with_kafka_broker_map(cfg, [sock]).proxy.kafka.brokers == (
            (("10.0.0.6", 9092), ("gw.example", port)),
        )
        cfg = gateway_config("-c", str(conf), "--advertise-host", "10.9.9.9", "--listen",
                             "0.0.0.0:0", "--upstream", "10.0.0.6:9092", *BASE)  # fmt: skip
        assert cfg.advertise_host == "10.9.9.9"  # the flag wins over the file
        http = gateway_config("--listen", "0.0.0.0:0", "--upstream", "10.0.0.6:80",
                              "--policy", "p.yaml", "--labels", "app=web")  # fmt: skip
        # HTTP listeners map nothing
        assert with_kafka_broker_map(http, [sock]).proxy.kafka.brokers == ()


def test_http2_limits_from_a_config_file_reach_the_session(tmp_path):
    from l7proxy.context import ConnContext, OriginalDestination
    from l7proxy.flows import FlowSink
    from l7proxy.http2.session import H2Session
    from l7proxy.metrics import ProxyMetrics

    conf = tmp_path / "gw.yaml"
    conf.write_text(
        "limits:\n  h2_max_concurrent_streams: 7\n  h2_reset_burst: 9\n  h2_control_refill: 11\n"
        "  h2_max_frame_size: 32768\n  h2_response_header_table_size: 4096\n"
        "  max_header_bytes: 8192\n"
    )
    cfg = gateway_config("-c", str(conf), "--listen", "127.0.0.1:0", "--upstream",
                         "127.0.0.1:1", "--policy", "p.yaml", "--labels", "app=web")  # fmt: skip
    ctx = ConnContext(
        config=cfg.proxy, client=("127.0.0.1", 1), listener_port=0,
        destination=OriginalDestination("127.0.0.1", 1), source_identity=2, source_labels=(),
        destination_identity=256, destination_labels=(), rules=lambda: None,
        flows=FlowSink(None), metrics=ProxyMetrics(),
    )  # fmt: skip
    limits = H2Session(ctx).relay.limits
    assert (limits.max_concurrent_streams, limits.reset_burst, limits.control_refill) == (7, 9, 11)
    assert limits.max_frame_size == 32768 and limits.response_header_table_size == 4096
    assert (limits.max_header_list_size, limits.hard_header_list_size) == (8192, 4 * 8192)
    assert limits.control_burst == 1000  # untouched fields keep the defaults


def test_invalid_http2_limit_is_a_config_error(tmp_path):
    import pytest

    conf = tmp_path / "gw.yaml"
    conf.write_text("limits:\n  h2_max_frame_size: 1000\n")
    with pytest.raises(ValueError, match="h2_max_frame_size"):
        gateway_config("-c", str(conf), "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:1",
                       "--policy", "p.yaml", "--labels", "app=web")  # fmt: skip


def test_admin_limits_are_a_typed_sub_config(tmp_path):
    import pytest

    from l7proxy.admin import AdminServer
    from l7proxy.config import AdminConfig, ProxyConfig, load_yaml

    cfg = tmp_path / "gw.yaml"
    cfg.write_text("limits: {admin: {max_head_bytes: 2048, read_timeout: 3}}\n")
    limits = ProxyConfig(**load_yaml(cfg)["limits"]).admin
    assert limits == AdminConfig(max_head_bytes=2048, read_timeout=3)
    assert AdminServer(limits).limits.max_head_bytes == 2048
    assert AdminServer().limits == ProxyConfig().admin == AdminConfig()
    cfg.write_text("limits: {admin: {max_head: 1}}\n")
    with pytest.raises(ValueError, match="unknown admin limits"):
        load_yaml(cfg)
    with pytest.raises(ValueError, match="admin max_head_bytes"):
        AdminConfig(max_head_bytes=10)
