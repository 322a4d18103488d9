"""Shared e2e fixtures: nginx, a Python backend and a Kafka broker on loopback, and a gateway
launcher."""

from __future__ import annotations

import pytest

from tests.conftest import need_binary
from tests.e2e.peers import Gateway, Nginx, PyBackend, free_port, policy_yaml


@pytest.fixture(scope="session")
def nginx():
    server = Nginx(need_binary("nginx"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pybackend():
    server = PyBackend()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def broker():
    """A noida-db Kafka broker for one test module (tests/e2e/kafka_broker.py)."""
    from tests.e2e.kafka_broker import KafkaBroker

    b = KafkaBroker().start()
    yield b
    b.stop()


@pytest.fixture
def start_gateway(tmp_path):
    """start_gateway(upstream_port, policy_text=None, *extra_args, port=None) -> Gateway.

    The policy is written for the gateway's own port (picked here, since the policy port is the
    listener port); `policy_text` may contain `{port}`. Flows go to tmp_path/flows.log."""
    started: list[Gateway] = []

    def start(upstream_port, policy_text=None, *extra, port=None, labels="app=web", admin=True):
        port = port or free_port()
        policy = tmp_path / f"policy-{len(started)}.yaml"
        text = (
            policy_yaml(port) if policy_text is None else policy_text.replace("{port}", str(port))
        )
        policy.write_text(text)
        args = [
            "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{upstream_port}",
            "--policy", str(policy),
            "--labels", labels,
            *(["--admin", "127.0.0.1:0"] if admin else []),
            *extra,
        ]  # fmt: skip
        gw = Gateway(args, flow_log=str(tmp_path / f"flows-{len(started)}.log"))
        gw.policy_path = policy
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()
