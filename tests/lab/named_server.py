"""A backend that says who it is and whom it saw: HTTP on one port ("NAME CLIENT_IP") and UDP
on another (the same, as the datagram's answer). Run inside an endpoint:
`l7proxy --node N endpoint exec EP -- python named_server.py NAME 8080 5353`."""

from __future__ import annotations

import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

NAME = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = f"{NAME} {self.client_address[0]}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def udp(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", port))
    while True:
        _, peer = sock.recvfrom(2048)
        sock.sendto(f"{NAME} {peer[0]}".encode(), peer)


def main() -> None:
    threading.Thread(target=udp, args=(int(sys.argv[3]),), daemon=True).start()
    ThreadingHTTPServer(("0.0.0.0", int(sys.argv[2])), Handler).serve_forever()


if __name__ == "__main__":
    main()
