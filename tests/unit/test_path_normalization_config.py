"""The path mode (issue 19) is one ProxyConfig field, set by the gateway's flag or `-c`."""

from __future__ import annotations

import pytest

from l7proxy.cli import build_parser
from l7proxy.commands.gateway import build_config
from l7proxy.config import ProxyConfig

BASE = ["--listen", "127.0.0.1:1", "--upstream", "127.0.0.1:2", "--policy", "p.yaml"]


def gateway_config(*argv: str):
    return build_config(build_parser().parse_args(["gateway", *BASE, *argv]))


def test_default_is_unescape():
    assert ProxyConfig().path_escaped_slashes == "unescape"
    assert gateway_config().proxy.path_escaped_slashes == "unescape"


def test_flag_and_config_file(tmp_path):
    assert gateway_config("--path-escaped-slashes", "keep").proxy.path_escaped_slashes == "keep"
    conf = tmp_path / "gw.yaml"
    conf.write_text("limits: {path_escaped_slashes: reject}\n")
    assert gateway_config("-c", str(conf)).proxy.path_escaped_slashes == "reject"
    cfg = gateway_config("-c", str(conf), "--path-escaped-slashes", "unescape")
    assert cfg.proxy.path_escaped_slashes == "unescape"  # the flag wins


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="path_escaped_slashes"):
        ProxyConfig(path_escaped_slashes="decode")
    with pytest.raises(SystemExit):
        gateway_config("--path-escaped-slashes", "decode")


def test_agent_flag_reaches_its_config():
    args = build_parser().parse_args(["agent"])
    assert args.path_escaped_slashes == "unescape"
    args = build_parser().parse_args(["agent", "--path-escaped-slashes", "keep"])
    assert args.path_escaped_slashes == "keep"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["agent", "--path-escaped-slashes", "decode"])


def test_agent_proxies_take_the_mode():
    from types import SimpleNamespace

    from l7proxy.agent.node_proxy import NodeProxy

    agent = SimpleNamespace(
        flows=SimpleNamespace(ingest=lambda flow: None, ingest_pending=lambda flow: None),
        metrics=SimpleNamespace(proxy=None),
    )
    assert NodeProxy(agent).config.path_escaped_slashes == "unescape"
    keep = ProxyConfig(path_escaped_slashes="keep")
    assert NodeProxy(agent, config=keep).config is keep
