"""A scripted client, relay and server in one process: h2 (the library) plays both peers."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events

from parsers.http2 import Decision, H2Limits, H2Relay
from parsers.http2 import frames as f
from parsers.http2.headers import encode_fields


def session_ctx(rules=lambda: None, config=None):
    """The ConnContext attributes an H2Session reads, for tests without a listener."""
    from types import SimpleNamespace

    from l7proxy.config import ProxyConfig
    from l7proxy.metrics import ProxyMetrics

    return SimpleNamespace(
        config=config or ProxyConfig(),
        proto_metrics=ProxyMetrics().for_proto("http2"),
        rules=rules,
        client_ip="127.0.0.1",
        client_port=1,
        sweeper=None,
    )


def deny_path(prefix: str):
    """A policy: everything except paths starting with `prefix`."""

    def decide(request):
        return Decision(allowed=not request.path.startswith(prefix))

    return decide


class Triangle:
    """client (h2) <-> relay <-> server (h2); `pump()` moves bytes until nothing is left."""

    def __init__(self, decide=None, limits: H2Limits | None = None, client_settings=None):
        self.relay = H2Relay(decide or (lambda r: Decision(True)), limits=limits or H2Limits())
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.client_events: list = []
        self.server_events: list = []
        self.relay_events: list = []
        self.client.initiate_connection()
        if client_settings:
            self.client.update_settings(client_settings)
        self.server.initiate_connection()
        self.auto_respond = True

    def feed_client_bytes(self, data: bytes) -> None:
        self.relay_events += self.relay.receive_client(data)

    def pump(self, rounds: int = 20) -> None:
        for _ in range(rounds):
            moved = False
            data = self.client.data_to_send()
            if data:
                moved = True
                self.relay_events += self.relay.receive_client(data)
            data = self.relay.data_to_server()
            if data:
                moved = True
                for event in self.server.receive_data(data):
                    self.server_events.append(event)
                    self.on_server_event(event)
            data = self.server.data_to_send()
            if data:
                moved = True
                self.relay_events += self.relay.receive_server(data)
            data = self.relay.data_to_client()
            if data:
                moved = True
                self.client_events += self.client.receive_data(data)
            if not moved:
                return

    def on_server_event(self, event) -> None:
        if not self.auto_respond:
            return
        if isinstance(event, h2.events.RequestReceived):
            headers = dict(event.headers)
            body = f"hello {headers[':path']}".encode()
            self.server.send_headers(
                event.stream_id,
                [(":status", "200"), ("content-length", str(len(body))), ("x-upstream", "yes")],
            )
            self.server.send_data(event.stream_id, body, end_stream=True)
        elif isinstance(event, h2.events.DataReceived):
            self.server.acknowledge_received_data(event.flow_controlled_length, event.stream_id)

    def request(self, path: str, method: str = "GET", extra=(), end_stream=True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(
            sid,
            [
                (":method", method),
                (":scheme", "http"),
                (":authority", "svc"),
                (":path", path),
                *extra,
            ],
            end_stream=end_stream,
        )
        return sid

    def responses(self) -> dict[int, dict]:
        """Per stream: status, headers, body, ended, reset code, seen by the client."""
        out: dict[int, dict] = {}
        for event in self.client_events:
            sid = getattr(event, "stream_id", None)
            if sid is None:
                continue
            item = out.setdefault(sid, {"headers": [], "body": b"", "ended": False, "reset": None})
            if isinstance(event, h2.events.ResponseReceived):
                item["headers"] = [(n.decode(), v.decode()) for n, v in event.headers]
                item["status"] = dict(item["headers"]).get(":status")
            elif isinstance(event, h2.events.TrailersReceived):
                item["trailers"] = [(n.decode(), v.decode()) for n, v in event.headers]
            elif isinstance(event, h2.events.DataReceived):
                item["body"] += event.data
                self.client.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded):
                item["ended"] = True
            elif isinstance(event, h2.events.StreamReset):
                item["reset"] = event.error_code
        return out


# ---- scripted relay: bytes in, bytes out ----------------------------------------------------


def frames_of(data: bytes) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 3], "big")
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big")
        out.append((data[pos + 3], data[pos + 4], sid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    return out


def started(decide=lambda r: Decision(not r.path.startswith("/private")), limits=H2Limits(),
            client_settings=(), server_settings=()) -> H2Relay:  # fmt: skip
    relay = H2Relay(decide, limits=limits)
    relay.receive_client(f.PREFACE + f.settings_frame(list(client_settings)))
    relay.receive_server(f.settings_frame(list(server_settings)))
    relay.data_to_client()
    relay.data_to_server()
    return relay


def get(path: str) -> bytes:
    return encode_fields(
        [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", path)]
    )
