"""The admin HTTP server: a route table, `/metrics`, `/healthz`, `/policy`, and streaming routes.

A handler is `async def handler(request: AdminRequest) -> AdminResponse`. For a streaming answer
(Server-Sent Events for `/map/events`) return `AdminResponse(stream=async_iterator_of_bytes)`:
the server writes the head, then every chunk as it comes, with no Content-Length, and closes the
connection when the iterator ends or the client goes away. Not on the hot path: plain asyncio
streams and one request per connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from l7proxy.config import AdminConfig

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass(slots=True)
class AdminResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncIterator[bytes] | None = None

    @classmethod
    def json(cls, obj, status: int = 200) -> AdminResponse:
        return cls(status, json.dumps(obj, indent=1).encode() + b"\n", "application/json")

    @classmethod
    def text(cls, text: str, status: int = 200) -> AdminResponse:
        return cls(status, text.encode())


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


class AdminServer:
    def __init__(self, limits: AdminConfig | None = None) -> None:
        self.limits = limits or AdminConfig()
        self._routes: dict[str, Handler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[asyncio.Task] = set()

    def add_route(self, path: str, handler: Handler) -> None:
        if not path.startswith("/"):
            raise ValueError("an admin route starts with /")
        self._routes[path] = handler

    def routes(self) -> list[str]:
        return sorted(self._routes)

    async def start(self, host: str, port: int, **kw) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._serve, host, port, **kw)
        return self._server.sockets[0].getsockname()[:2]

    async def start_unix(self, path: str) -> None:
        """Serve on a unix socket (the workers' private metrics endpoint)."""
        self._server = await asyncio.start_unix_server(self._serve, path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._clients):
            task.cancel()
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._clients.add(task)
        try:
            try:
                head = await asyncio.wait_for(
                    reader.readuntil(b"\r\n\r\n"), timeout=self.limits.read_timeout
                )
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            if len(head) > self.limits.max_head_bytes:
                return
            request = _parse_head(head)
            if request is None:
                await _write(writer, AdminResponse.text("bad request\n", 400))
                return
            response = await self.dispatch(request)
            await _write(writer, response, head_only=request.method == "HEAD")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def dispatch(self, request: AdminRequest) -> AdminResponse:
        handler = self._routes.get(request.path)
        if handler is None:
            return AdminResponse.text("not found\n", 404)
        if request.method not in ("GET", "HEAD"):
            return AdminResponse.text("method not allowed\n", 405)
        try:
            return await handler(request)
        except Exception as exc:  # a broken handler answers 500, the server stays up
            return AdminResponse.text(f"internal error: {type(exc).__name__}\n", 500)


def _parse_head(head: bytes) -> AdminRequest | None:
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, _version = lines[0].split(" ")
    except ValueError:
        return None
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                return None
            headers[name.strip().lower()] = value.strip()
    url = urlsplit(target)
    return AdminRequest(method, url.path or "/", parse_qs(url.query), headers)


async def _write(writer: asyncio.StreamWriter, resp: AdminResponse, head_only=False) -> None:
    reason = _REASONS.get(resp.status, "Unknown")
    head = [f"HTTP/1.1 {resp.status} {reason}", f"content-type: {resp.content_type}"]
    head += [f"{k}: {v}" for k, v in resp.headers.items()]
    if resp.stream is None:
        head.append(f"content-length: {len(resp.body)}")
    else:
        head.append("cache-control: no-cache")
    head.append("connection: close")
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
    if head_only:
        await writer.drain()
        return
    if resp.stream is None:
        writer.write(resp.body)
        await writer.drain()
        return
    try:
        async for chunk in resp.stream:
            writer.write(chunk)
            await writer.drain()
    finally:
        aclose = getattr(resp.stream, "aclose", None)
        if aclose is not None:
            await aclose()


async def fetch_unix(path: str, target: str, timeout: float = 2.0) -> bytes:
    """GET `target` from an admin server on a unix socket; the body, b"" on any failure."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), timeout)
    except (OSError, TimeoutError):
        return b""
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nhost: worker\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), timeout)
    except (OSError, TimeoutError):
        return b""
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith(b"HTTP/1.1 200") else b""


def install_core_routes(
    admin: AdminServer, metrics, policy_info: Callable[[], dict], peer_sockets=()
) -> None:
    """Mount /metrics, /healthz and /policy (policy_info returns revision and files).
    `peer_sockets`: unix sockets of the other workers, whose metrics are summed into ours."""
    from l7proxy.metrics import merge_expositions

    async def metrics_route(request: AdminRequest) -> AdminResponse:
        text = metrics.render()
        if peer_sockets:
            others = await asyncio.gather(*(fetch_unix(p, "/metrics") for p in peer_sockets))
            text = merge_expositions([text, *(o.decode() for o in others if o)])
        return AdminResponse(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def healthz(request: AdminRequest) -> AdminResponse:
        return AdminResponse.text("ok\n")

    async def policy(request: AdminRequest) -> AdminResponse:
        return AdminResponse.json(policy_info())

    admin.add_route("/metrics", metrics_route)
    admin.add_route("/healthz", healthz)
    admin.add_route("/policy", policy)
