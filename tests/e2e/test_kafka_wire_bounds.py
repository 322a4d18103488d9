"""Issue 19 through the real `l7proxy gateway --protocol kafka --workers 1` in front of a real
broker (noida-db): the 214-byte Produce that claimed 13 million topics cost the worker 11 s of CPU,
during which it served nobody. Now it is refused at once and a normal client on another
connection is served right after, within a bound; the gateway spends almost no CPU on it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time

import pytest

from tests.e2e.kafka_broker import KafkaBroker, start_gateway
from tests.unit.kafka.test_wire_bounds import ISSUE_REQUEST, _produce_v8

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# A valid header this time (client id null), so the request reaches the Produce body parser.
NAME_MINUS_6 = _produce_v8(13_369_344, -6)


@pytest.fixture(scope="module")
def broker():
    b = KafkaBroker().start()
    yield b
    b.stop()


@pytest.fixture
def gateway(broker, tmp_path):
    gw = start_gateway(broker, tmp_path, "kafka", extra=["--workers", "1"])
    yield gw
    gw.stop()


def _cpu_seconds(pgid: int) -> float:
    """utime + stime of every process in the gateway's process group (it and its workers)."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()  # noqa: SIM115
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the name: state, ppid, pgrp, ...
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _closed_within(sock: socket.socket, timeout: float) -> bool:
    """True when the gateway closes (or resets) the connection before `timeout`, having sent
    nothing but an error answer at most."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _api_versions_round_trip(port: int) -> float:
    body = struct.pack(">hhih", 18, 0, 99, 6) + b"normal"
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack(">i", len(body)) + body)
        head = b""
        while len(head) < 8:
            chunk = s.recv(8 - len(head))
            assert chunk, "the gateway closed a normal client's connection"
            head += chunk
    assert struct.unpack(">ii", head)[1] == 99
    return time.monotonic() - started


def test_issue_request_is_refused_and_others_are_served_promptly(gateway):
    cpu_before = _cpu_seconds(gateway.proc.pid)
    bad = []
    for raw in (ISSUE_REQUEST, NAME_MINUS_6):
        s = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        s.sendall(raw)
        bad.append(s)
    # Right behind them, on its own connection, a normal client: the one worker must answer it.
    latency = _api_versions_round_trip(gateway.port)
    assert latency < 1.0, f"a normal client waited {latency:.2f} s behind the bad requests"
    for s in bad:
        assert _closed_within(s, 5.0), "the malformed request's connection stayed open"
        s.close()
    cpu = _cpu_seconds(gateway.proc.pid) - cpu_before
    assert cpu < 0.5, f"the gateway spent {cpu:.2f} s of CPU on two small requests"

    flows = gateway.wait_flows_until(
        lambda fl: sum(f["verdict"] == "ERROR" for f in fl) >= 2, timeout=10
    )
    errors = [f for f in flows if f["verdict"] == "ERROR"]
    assert len(errors) >= 2, flows

    # And a real client still produces through the same worker.
    from aiokafka import AIOKafkaProducer

    async def produce():
        producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{gateway.port}")
        await producer.start()
        try:
            started = time.monotonic()
            await producer.send_and_wait(gateway.topic, b"after the bad requests")
            return time.monotonic() - started
        finally:
            await producer.stop()

    took = asyncio.run(asyncio.wait_for(produce(), 30))
    assert took < 10.0
