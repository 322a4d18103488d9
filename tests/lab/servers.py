"""A pod's test servers: HTTP/1.1 on every port given (IPv4 and IPv6: one dual-stack socket on
[::]), 200 "ok PORT PATH" for GET, 201 for POST.
Run inside an endpoint: `l7proxy --node N endpoint exec EP -- python servers.py 8080 9090`."""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    def _answer(self, status: int) -> None:
        body = f"ok {self.server.server_address[1]} {self.path}\n".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(200)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(201)

    def log_message(self, *args) -> None:
        pass


class DualStackServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def main() -> None:
    servers = [DualStackServer(("::", int(p)), Handler) for p in sys.argv[1:]]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("listening", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
