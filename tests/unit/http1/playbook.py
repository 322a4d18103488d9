"""Scripted playbooks for the HTTP/1 session: fake transports on both sides, no sockets.

`Play` wires an Http1Session to a fake client transport and hands out fake upstream
connections; a test sends bytes from either side and asserts on what each side was sent."""

from __future__ import annotations

import io

from l7proxy.config import ProxyConfig
from l7proxy.context import ConnContext, OriginalDestination
from l7proxy.flows import FlowSink
from l7proxy.http1.session import Http1Session
from l7proxy.http1.upstream import UpstreamConn
from l7proxy.metrics import ProxyMetrics


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.reading = True
        self.closed = False
        self.aborted = False
        self.protocol = None

    def write(self, data) -> None:
        assert not self.closed, "write after close"
        self.out += data

    def writelines(self, parts) -> None:
        for part in parts:
            self.write(part)

    def take(self) -> bytes:
        data = bytes(self.out)
        self.out.clear()
        return data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0  # (everything written is taken at once)

    def get_extra_info(self, name, default=None):
        return default


class FakePool:
    """Every acquire gives a fresh, already connected upstream connection."""

    def __init__(self) -> None:
        self.conns: list[UpstreamConn] = []
        self.released: list[UpstreamConn] = []

    def acquire(self, dest):
        conn = UpstreamConn(dest)
        conn.connection_made(FakeTransport())
        self.conns.append(conn)
        return conn

    def release(self, conn) -> None:
        self.released.append(conn)
        conn.session = None


class PathRules:
    """A tiny rule set: allow a method on paths with a prefix (the contract's `check`)."""

    parser = "http"
    allow_all = False

    def __init__(self, method="GET", prefix="/public/", actions=()):
        self.method, self.prefix, self.actions = method, prefix, actions

    def check(self, method, path, host, headers):
        from types import SimpleNamespace

        ok = method == self.method and path.startswith(self.prefix)
        return SimpleNamespace(allowed=ok, matched=(0,) if ok else (), header_actions=self.actions)


class Play:
    def __init__(self, rules=None, config: ProxyConfig | None = None) -> None:
        self.flow_out = io.StringIO()
        self.rules = rules if rules is not None else PathRules()
        self.metrics = ProxyMetrics()
        ctx = ConnContext(
            config=config or ProxyConfig(),
            client=("10.0.0.9", 5555),
            listener_port=80,
            destination=OriginalDestination("127.0.0.1", 8080),
            source_identity=2,
            source_labels=("reserved:world",),
            destination_identity=256,
            destination_labels=("k8s:app=web",),
            rules=lambda: self.rules,
            flows=FlowSink(stream=self.flow_out),
            metrics=self.metrics,
        )
        self.pool = FakePool()
        self.session = Http1Session(ctx, pool=self.pool)
        self.client = FakeTransport()
        self.metrics.for_proto("http").active.inc()
        self.session.connection_made(self.client)

    @property
    def up(self) -> UpstreamConn:
        return self.pool.conns[-1]

    def client_sends(self, data: bytes) -> None:
        self.session.data_received(data)

    def upstream_sends(self, data: bytes) -> None:
        self.up.data_received(data)

    def upstream_got(self) -> bytes:
        return self.up.transport.take() if self.pool.conns else b""

    def client_got(self) -> bytes:
        return self.client.take()

    def flows_text(self) -> str:
        self.session.ctx.flows.flush()
        return self.flow_out.getvalue()

    def flows(self):
        import json

        self.session.ctx.flows.flush()
        return [json.loads(x) for x in self.flow_out.getvalue().splitlines()]
