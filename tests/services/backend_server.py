"""A service backend for the tests: HTTP on :8080 and UDP on :5353 answer with the backend's
name (and, for HTTP, the path and the client's address); TCP :7070 answers every line of a
long-lived connection with the name. Prints "listening" when all are up.

    python -m tests.services.backend_server NAME IP
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HTTP_PORT = 8080
UDP_PORT = 5353
LINE_PORT = 7070


def handler(body_of: Callable[[BaseHTTPRequestHandler], bytes]) -> type[BaseHTTPRequestHandler]:
    """A quiet handler answering every GET with 200 and body_of(request); also the e2e tests'
    backend (tests/e2e/test_gateway_ipv6.py)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = body_of(self)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    return Handler


def main() -> None:
    name, ip = sys.argv[1], sys.argv[2]
    ThreadingHTTPServer.allow_reuse_address = True
    httpd = ThreadingHTTPServer(
        (ip, HTTP_PORT), handler(lambda r: f"{name} {r.path} {r.client_address[0]}\n".encode())
    )
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((ip, UDP_PORT))

    def echo() -> None:
        while True:
            data, peer = udp.recvfrom(2048)
            udp.sendto(f"{name} {data.decode(errors='replace')}".encode(), peer)

    threading.Thread(target=echo, daemon=True).start()
    lines = socket.create_server((ip, LINE_PORT))

    def answer(conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            for line in f:
                f.write(f"{name} {line.decode(errors='replace')}".encode())
                f.flush()

    def accept() -> None:
        while True:
            conn, _ = lines.accept()
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    print("listening", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
