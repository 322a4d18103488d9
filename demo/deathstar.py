"""The deathstar: a tiny HTTP service. `python -m demo.deathstar HOST [PORT]` (port 80 by
default) prints `listening` once it accepts connections, then serves until killed.

The demo runs it inside the deathstar endpoint's namespace (node mode) or on loopback behind the
gateway; the agent e2e tests use it as their backend too.
"""

from __future__ import annotations

import socketserver
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (method, path) -> (status, body); any other POST or PUT is 404, any GET the station's data.
ROUTES = {
    ("POST", "/v1/request-landing"): (200, "Ship landed\n"),
    ("PUT", "/v1/exhaust-port"): (503, "Panic: deathstar exploded\n"),
}


class Deathstar(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _route(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self._answer(*ROUTES.get((self.command, self.path), (404, "Not found\n")))

    do_POST = do_PUT = _route  # noqa: N815 (http.server's naming)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, '{"name": "Death Star", "model": "DS-1 Orbital Battle Station"}\n')

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name; a fresh namespace has no DNS to ask.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def serve(host: str, port: int = 80) -> None:
    server = _Server((host, port), Deathstar)
    print("listening", flush=True)
    server.serve_forever()


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print("usage: python -m demo.deathstar HOST [PORT]", file=sys.stderr)
        return 2
    serve(argv[0], int(argv[1]) if len(argv) == 2 else 80)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
