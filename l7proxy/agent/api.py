"""The agent's local API: JSON lines over a unix socket.

A request is one line `{"op": "endpoint.create", "args": {...}}`. A plain answer is one line
`{"ok": true, "result": ...}` or `{"ok": false, "error": "...", "details": [...]}`. A streaming op
(`observe` with follow) answers with one `{"flow": {...}}` line per flow until the client closes.
The socket is mode 0600: the API is as powerful as root on this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

MAX_REQUEST = 8 * 1024 * 1024  # a policy import carries whole files


class ApiError(Exception):
    """An error the client shows to the user as it is (with optional detail lines)."""

    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


Handler = Callable[[dict], Awaitable[object]]
StreamHandler = Callable[[dict], AsyncIterator[dict]]


class ApiServer:
    def __init__(self) -> None:
        self._ops: dict[str, Handler] = {}
        self._streams: dict[str, StreamHandler] = {}
        self._sinks: dict[str, Callable[[dict, dict], None]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    def op(self, name: str, handler: Handler) -> None:
        self._ops[name] = handler

    def stream(self, name: str, handler: StreamHandler) -> None:
        self._streams[name] = handler

    def sink(self, name: str, handler: Callable[[dict, dict], None]) -> None:
        """An inbound stream: after the request line, every line the client sends is handed to
        `handler(args, obj)` until it hangs up (the proxy worker's flows and metrics)."""
        self._sinks[name] = handler

    async def start(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket from a killed agent
        old = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, str(path), limit=MAX_REQUEST
            )
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    request = json.loads(line)
                    op, args = request["op"], request.get("args") or {}
                except (ValueError, KeyError, TypeError):
                    await _send(writer, {"ok": False, "error": "malformed request"})
                    return
                if op in self._streams:
                    await self._stream(op, args, reader, writer)
                    return
                if op in self._sinks:
                    await self._sink(op, args, reader, writer)
                    return
                await _send(writer, await self._call(op, args))
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _call(self, op: str, args: dict) -> dict:
        handler = self._ops.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown operation {op!r}"}
        try:
            return {"ok": True, "result": await handler(args)}
        except ApiError as exc:
            return {"ok": False, "error": str(exc), "details": exc.details}
        except Exception as exc:  # one failed call never takes the agent down
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    async def _stream(self, op, args, reader, writer) -> None:
        # The stream ends when the handler ends or when the client hangs up (EOF on reader).
        gone = asyncio.ensure_future(reader.read())
        items = self._streams[op](args).__aiter__()
        try:
            while True:
                nxt = asyncio.ensure_future(items.__anext__())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    nxt.cancel()
                    return
                try:
                    item = nxt.result()
                except StopAsyncIteration:
                    return
                await _send(writer, item)
        finally:
            gone.cancel()
            with contextlib.suppress(Exception):
                await items.aclose()

    async def _sink(self, op: str, args: dict, reader, writer) -> None:
        # Each line handled is acknowledged: `{"ack": N}` (N lines so far), one write per read
        # burst (call_soon runs once the reader's buffer is drained and the task waits). A
        # sender keeps what is not acknowledged and sends it again to the next agent: lines
        # still in the socket buffer when this agent stops are otherwise lost.
        handler = self._sinks[op]
        loop = asyncio.get_running_loop()
        handled, acking = 0, False

        def ack() -> None:
            nonlocal acking
            acking = False
            if not writer.is_closing():
                writer.write(b'{"ack":%d}\n' % handled)

        while line := await reader.readline():
            handled += 1
            try:
                handler(args, json.loads(line))
            except Exception:  # a bad line is dropped, the channel stays open
                pass
            if not acking:
                acking = True
                loop.call_soon(ack)


async def _send(writer: asyncio.StreamWriter, obj: dict) -> None:
    writer.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")
    await writer.drain()
