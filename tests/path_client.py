"""Clients that send a request target byte for byte, for the path-normalisation tests (issue 19):
HTTP/1 over a raw socket, HTTP/2 with the h2 library's own header checks off (so `:path` may hold
`#`, a space or a control byte). Also a command, so the agent tests can run it inside an
endpoint's namespace or cgroup:

    python tests/path_client.py HOST PORT h1|h2 TARGETS.json  ->  JSON [[status, body], ...]

(status 0: the connection closed or the stream was reset without a response).
"""

from __future__ import annotations

import json
import socket
import sys

import h2.config
import h2.connection
import h2.events


def h1_get(host: str, port: int, target: str) -> tuple[int, bytes]:
    req = b"GET %s HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n" % target.encode("latin-1")
    out = b""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(req)
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    head, _, body = out.partition(b"\r\n\r\n")
    fields = head.split(b" ", 2)
    return (int(fields[1]) if len(fields) > 1 else 0), body


def h2_get(host: str, port: int, target: str) -> tuple[int, bytes]:
    """One GET with `:path` = target, byte for byte, on a fresh h2c connection."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
    )
    conn.initiate_connection()
    headers = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"web"),
        (b":path", target.encode("latin-1")),
    ]
    conn.send_headers(1, headers, end_stream=True)
    status, body = 0, b""
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(conn.data_to_send())
        done = False
        while not done:
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    status = int(dict(ev.headers)[b":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(
                    ev,
                    h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated,
                ):
                    done = True
            s.sendall(conn.data_to_send())
    return status, body


def main(argv: list[str]) -> int:
    host, port, proto, targets_file = argv
    get = h2_get if proto == "h2" else h1_get
    with open(targets_file) as f:
        targets = json.load(f)
    out = []
    for target in targets:
        try:
            status, body = get(host, int(port), target)
        except OSError as exc:
            status, body = 0, str(exc).encode()
        out.append([status, body.decode("latin-1")])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
