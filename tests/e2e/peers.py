"""Real peers on loopback for the end-to-end tests: nginx, a Python HTTP/1.1 backend with the odd
behaviours a proxy must survive, and the gateway itself as a subprocess."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from l7proxy.platform import free_port

REPO = Path(__file__).resolve().parents[2]


def wait_port(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


NGINX_CONF = """daemon off;
worker_processes 1;
error_log {dir}/error.log;
pid {dir}/nginx.pid;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    root {dir}/html;
    location /upload {{ client_max_body_size 64m; return 200 "uploaded\\n"; }}
  }}
}}
"""


class NginxServer:
    """nginx on a free loopback port from a config template (`{dir}`, `{port}`) and the files to
    serve under html/ (relative path -> bytes); stopped by its own process group."""

    def __init__(
        self, binary: str, conf_template: str, files: dict[str, bytes], prefix: str
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix=prefix)
        os.chmod(self.dir, 0o755)  # nginx workers run as an unprivileged user
        self.port = free_port()
        for rel, data in files.items():
            path = Path(self.dir, "html", rel)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        conf = Path(self.dir, "nginx.conf")
        conf.write_text(conf_template.format(dir=self.dir, port=self.port))
        self.proc = subprocess.Popen(
            [binary, "-c", str(conf), "-p", self.dir],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)


class Nginx(NginxServer):
    def __init__(self, binary: str) -> None:
        # 8 MiB of varied bytes for streaming checks (public/big.bin).
        block = bytes(range(256)) * 4096
        big = b"".join(bytes([i]) + block for i in range(8))[: 8 << 20]
        files = {
            "public/index.html": b"hello from nginx\n",
            "private.html": b"secret\n",
            "public/big.bin": big,
        }
        super().__init__(binary, NGINX_CONF, files, "l7proxy-nginx-")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pybackend"

    def log_message(self, *args) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    trailers = []
                    while (line := self.rfile.readline()) not in (b"\r\n", b""):
                        trailers.append(line.strip().decode())
                    self.server.last_trailers = trailers
                    return out
                out += self.rfile.read(size)
                self.rfile.read(2)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _reply(self, status: int, body: bytes, extra=()) -> None:
        self.send_response(status)
        for k, v in extra:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        self.server.requests.append((self.command, self.path, dict(self.headers.items())))
        path = self.path
        if path.startswith("/slow"):
            time.sleep(float(path.rsplit("/", 1)[-1]))
            body = self._body()
            self._reply(200, b"slow done\n")
            return
        if path.startswith("/reset"):
            self._body()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\npartial")
            self.wfile.flush()
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            self.close_connection = True
            return
        if path.startswith("/chunked"):
            self._body()
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Trailer", "X-Checksum")
            self.end_headers()
            for part in (b"one,", b"two,", b"three"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self.wfile.write(b"0\r\nX-Checksum: 42\r\n\r\n")
            return
        if path.startswith("/ws"):
            upgrade = self.headers.get("Upgrade", "")
            if not upgrade:
                self._reply(400, b"need upgrade\n")
                return
            self.send_response(101)
            self.send_header("Upgrade", upgrade)
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.flush()
            self._echo_upper()
            return
        if path.startswith("/noupgrade"):
            self._reply(200, b"no upgrade for you\n")
            return
        body = self._body()
        text = f"{self.command} {path} len={len(body)}\n".encode()
        headers = "".join(f"{k.lower()}: {v}\n" for k, v in self.headers.items())
        self._reply(200, text + headers.encode() + b"\n" + body)

    def _echo_upper(self) -> None:
        while data := self.connection.recv(65536):
            self.connection.sendall(data.upper())
        self.close_connection = True

    def do_CONNECT(self) -> None:
        self.server.requests.append((self.command, self.path, dict(self.headers.items())))
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()
        self._echo_upper()

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle


class PyBackend:
    """A threaded HTTP/1.1 backend: echo, /chunked (trailers), /slow/N, /reset, /ws (101+echo),
    /noupgrade. `requests` records (method, path, headers) of everything that reached it."""

    def __init__(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.requests = []
        self.server.last_trailers = []
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list:
        return self.server.requests

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


LISTEN_RE = re.compile(r"listening \S+ [\d.]+:(\d+)")
ADMIN_RE = re.compile(r"admin [\d.]+:(\d+)")


class Gateway:
    """`l7proxy gateway` as a subprocess; waits for its `ready` line on stderr."""

    def __init__(self, args: list[str], flow_log: str | None = None, timeout=30.0) -> None:
        self.flow_log = flow_log
        cmd = [sys.executable, "-m", "l7proxy", "gateway", *args]
        if flow_log:
            cmd += ["--flow-log", flow_log]
        self.stderr_path = tempfile.mktemp(prefix="l7proxy-gw-", suffix=".log")
        self._err = open(self.stderr_path, "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=self._err, cwd=REPO, start_new_session=True
        )
        self.port = self.admin_port = None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            text = self.log()
            if "ready:" in text:
                self.port = int(LISTEN_RE.search(text).group(1))
                m = ADMIN_RE.search(text)
                self.admin_port = int(m.group(1)) if m else None
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {text}")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"gateway not ready: {self.log()}")

    def log(self) -> str:
        return Path(self.stderr_path).read_text()

    def signal(self, sig) -> None:
        self.proc.send_signal(sig)

    def flows(self) -> list[dict]:
        if not self.flow_log or not Path(self.flow_log).exists():
            return []
        return flow_log_lines(Path(self.flow_log))

    def wait_flows(self, count: int, timeout: float = 10.0) -> list[dict]:
        """The flows once at least `count` are written (flows are flushed asynchronously)."""
        return self.wait_flows_until(lambda flows: len(flows) >= count, timeout)

    def wait_flows_until(self, done, timeout: float = 10.0) -> list[dict]:
        """The flows once `done(flows)` holds, or whatever is there after `timeout`."""
        end = time.monotonic() + timeout
        while not done(flows := self.flows()) and time.monotonic() < end:
            time.sleep(0.05)
        return flows

    def wait_log(self, text: str, timeout: float = 10.0) -> str:
        end = time.monotonic() + timeout
        while text not in (log := self.log()) and time.monotonic() < end:
            time.sleep(0.05)
        return log

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._err.close()
        return self.proc.returncode


def policy_yaml(
    port: int,
    http_rules: str = '- method: GET\n          path: "/public/.*"',
    *,
    from_block: str = "",
) -> str:
    """A CiliumNetworkPolicy for the gateway endpoint app=web on `port` with the given rules."""
    return f"""apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - {from_block}toPorts:
    - ports:
      - port: "{port}"
        protocol: TCP
      rules:
        http:
        {http_rules}
"""


def wait_for(condition, timeout: float = 10.0, interval: float = 0.05):
    """Poll `condition()` until it is truthy (then return it) or `timeout` passes (None)."""
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > end:
            return value
        time.sleep(interval)


def raw_exchange(port: int, data: bytes, timeout: float = 5.0, until_close=True) -> bytes:
    """Send `data`, read until the server closes (or `timeout`)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if not until_close and out.endswith(b"\r\n\r\n"):
                    break
        except (TimeoutError, ConnectionResetError):
            pass
        return out


def flow_log_lines(path: Path) -> list[dict]:
    """The flows a `--flow-log` file holds now. The gateway may be half way through writing a
    line: only whole lines are flows."""
    import json

    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines() if line]
