"""The gateway's config: flags, `-c CONFIG.yaml`, and what reaches the workers."""

from __future__ import annotations

import socket

from l7proxy.cli import build_parser
from l7proxy.commands.gateway import build_config
from l7proxy.gateway import install_kafka_broker_map
from l7proxy.kafka import settings


def gateway_config(*argv: str):
    return build_config(build_parser().parse_args(["gateway", *argv]))


BASE = ("--policy", "p.yaml", "--labels", "app=kafka", "--protocol", "kafka")


def test_broker_map_is_built_from_bound_ports_and_advertise_host(tmp_path):
    cfg = gateway_config("--listen", "0.0.0.0:0", "--upstream", "10.0.0.6:9092", *BASE)
    assert cfg.advertise_host is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        try:
            # A listener asking for port 0 advertises the port it was given, on 127.0.0.1.
            assert install_kafka_broker_map(cfg, [sock]) == {
                ("10.0.0.6", 9092): ("127.0.0.1", port)
            }
            conf = tmp_path / "gw.yaml"
            conf.write_text("advertise_host: gw.example\n")
            cfg = gateway_config("-c", str(conf), "--listen", "0.0.0.0:0", "--upstream",
                                 "10.0.0.6:9092", *BASE)  # fmt: skip
            assert cfg.advertise_host == "gw.example"
            install_kafka_broker_map(cfg, [sock])
            assert settings._broker_map == {("10.0.0.6", 9092): ("gw.example", port)}
            cfg = gateway_config("-c", str(conf), "--advertise-host", "10.9.9.9", "--listen",
                                 "0.0.0.0:0", "--upstream", "10.0.0.6:9092", *BASE)  # fmt: skip
            assert cfg.advertise_host == "10.9.9.9"  # the flag wins over the file
            http = gateway_config("--listen", "0.0.0.0:0", "--upstream", "10.0.0.6:80",
                                  "--policy", "p.yaml", "--labels", "app=web")  # fmt: skip
            assert install_kafka_broker_map(http, [sock]) == {}  # HTTP listeners map nothing
        finally:
            settings.set_broker_map({})
