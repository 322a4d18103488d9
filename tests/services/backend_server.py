"""A service backend for the tests: HTTP on :8080 and UDP on :5353 answer with the backend's
name (and, for HTTP, the path and the client's address). Prints "listening" when both are up.

    python -m tests.services.backend_server NAME IP
"""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HTTP_PORT = 8080
UDP_PORT = 5353


def main() -> None:
    name, ip = sys.argv[1], sys.argv[2]

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = f"{name} {self.path} {self.client_address[0]}\n".encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    httpd = ThreadingHTTPServer((ip, HTTP_PORT), Handler)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((ip, UDP_PORT))

    def echo() -> None:
        while True:
            data, peer = udp.recvfrom(2048)
            udp.sendto(f"{name} {data.decode(errors='replace')}".encode(), peer)

    threading.Thread(target=echo, daemon=True).start()
    print("listening", flush=True)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
