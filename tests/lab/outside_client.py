"""An outside client (run in the lab's "external" namespace): N requests to HOST:PORT, one JSON
line each: {"ok", "body", "peer"}. TCP: one HTTP GET per connection (peer: the address the
connection was made to, which answered). UDP: one datagram per fresh socket, `peer` is the
source address of the answer as recvfrom() saw it. `--sport P` binds that source port.
`hold`: N connections (from ports P, P+1, ...) opened at once, then, for each line read on
stdin, one request on each; a line per connection and request: {"ok", "body"|"error",
"seconds"} (how long the request took to answer or fail).

    python outside_client.py tcp|udp HOST PORT N [--sport P]
    python outside_client.py hold HOST PORT N --sport P
"""

from __future__ import annotations

import json
import socket
import sys
import time

TIMEOUT = 2.0


def tcp(host: str, port: int, sport: int) -> dict:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(TIMEOUT)
        if sport:
            s.bind(("0.0.0.0", sport))
        s.connect((host, port))
        s.sendall(f"GET / HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return {"ok": True, "body": data.split(b"\r\n\r\n", 1)[-1].decode(),
                "peer": list(s.getpeername())}  # fmt: skip


def udp(host: str, port: int, sport: int) -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        s.bind(("0.0.0.0", sport))
        s.sendto(b"who", (host, port))
        data, peer = s.recvfrom(2048)
        return {"ok": True, "body": data.decode(), "peer": list(peer)}


def hold(host: str, port: int, n: int, sport: int) -> None:
    conns = []
    for i in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.settimeout(5.0)
        s.bind(("0.0.0.0", sport + i))
        s.connect((host, port))
        conns.append(s)
    print(json.dumps({"connected": n}), flush=True)
    for _ in sys.stdin:
        for s in conns:
            started = time.monotonic()
            try:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                head = s.recv(4096)
                out = {"ok": bool(head), "body": head.split(b"\r\n\r\n", 1)[-1].decode()}
            except OSError as exc:
                out = {"ok": False, "error": type(exc).__name__}
            print(json.dumps({**out, "seconds": round(time.monotonic() - started, 3)}), flush=True)


def main() -> None:
    kind, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sport = int(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[5] == "--sport" else 0
    if kind == "hold":
        hold(host, port, n, sport)
        return
    for _ in range(n):
        try:
            out = (tcp if kind == "tcp" else udp)(host, port, sport)
        except OSError as exc:
            out = {"ok": False, "error": str(exc)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
