"""A service client for the tests, run inside an endpoint's namespace and the LB's cgroup.

    python -m tests.services.client tcp VIP PORT COUNT [PATH]  -> one JSON line per connection:
        {"backend": NAME | null, "status": int | null, "peer": [ip, port], "error": str | null,
         "seen": the client address the backend reports after its name, if it does}
    python -m tests.services.client udp VIP PORT COUNT         -> {"backend", "source", "error",
                                                                   "seen"}
    python -m tests.services.client tcp-for VIP PORT SECONDS   -> as tcp, new connections one
        after the other for SECONDS (a client under load while backends change), each line with
        the CLOCK_MONOTONIC time it started; a connection waits up to LOOP_TIMEOUT, not TIMEOUT

Each TCP connection is a new socket: connect, one GET, read the answer, close.
"""

from __future__ import annotations

import json
import socket
import sys
import time

TIMEOUT = 1.0
LOOP_TIMEOUT = 5.0  # tcp-for: a slow answer on a loaded machine is not a failed connection


def tcp(vip: str, port: int, path: str, timeout: float = TIMEOUT) -> dict:
    out = {"backend": None, "status": None, "peer": None, "error": None, "seen": None}
    try:
        with socket.socket() as s:
            s.settimeout(timeout)
            try:
                s.connect((vip, port))
            except OSError:
                out["local"] = list(s.getsockname())
                raise
            out["peer"] = list(s.getpeername())
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        out["status"] = int(head.split()[1]) if head else None
        if out["status"] == 200:
            words = body.decode().split()
            out["backend"], out["seen"] = words[0], (words[1:2] or [None])[0]
    except OSError as exc:
        out["error"] = type(exc).__name__ + ": " + str(exc)
    return out


def udp(vip: str, port: int, n: int) -> dict:
    out = {"backend": None, "source": None, "error": None, "seen": None}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.sendto(f"ping{n}".encode(), (vip, port))
            data, source = s.recvfrom(2048)
            words = data.decode().split()
            out["backend"], out["source"] = words[0], list(source)
            out["seen"] = (words[1:2] or [None])[0]
        except OSError as exc:
            out["error"] = type(exc).__name__ + ": " + str(exc)
    return out


def main() -> None:
    kind, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    path = sys.argv[5] if len(sys.argv) > 5 else "/"
    if kind == "tcp-for":
        end = time.monotonic() + float(sys.argv[4])
        while (started := time.monotonic()) < end:
            print(
                json.dumps({**tcp(vip, port, path, LOOP_TIMEOUT), "started": started}), flush=True
            )
        return
    count = int(sys.argv[4])
    for n in range(count):
        result = tcp(vip, port, path) if kind == "tcp" else udp(vip, port, n)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
