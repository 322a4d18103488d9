"""A client that holds connections to a service open, for the graceful-termination tests; run
inside an endpoint's namespace and the LB's cgroup.

    python -m tests.services.holder VIP TCP_PORT UDP_PORT N

Opens N TCP connections and N connected UDP sockets to the VIP and prints one JSON line
{"tcp": [backend, ...], "udp": [backend, ...]}. Then each "ask" line on stdin asks every socket
again and prints {"tcp": [...], "udp": [...]}: the backend that answered, or the error
("ECONNABORTED", "timeout", ...), the socket's pending error (SO_ERROR) first: what a client
blocked in recv() would get.
"""

from __future__ import annotations

import errno
import itertools
import json
import socket
import sys

TIMEOUT = 1.0


def _error(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def ask(sock: socket.socket, udp: bool) -> str:
    pending = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if pending:
        return errno.errorcode.get(pending, str(pending))
    try:
        if udp:
            sock.send(b"ping")
            return sock.recv(2048).decode().split()[0]
        sock.sendall(b"ping\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return "closed"
            data += chunk
        return data.decode().split()[0]
    except OSError as exc:
        return _error(exc)


def main() -> None:
    vip, tcp_port, udp_port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    tcp = [socket.create_connection((vip, tcp_port), timeout=TIMEOUT) for _ in range(n)]
    udp = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(TIMEOUT)
        s.connect((vip, udp_port))
        udp.append(s)
    for _ in itertools.chain(["open"], sys.stdin):  # stdin is read line by line, as it comes
        out = {"tcp": [ask(s, False) for s in tcp], "udp": [ask(s, True) for s in udp]}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
