"""The CLI's side of the agent API: blocking JSON lines over the unix socket."""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
from collections.abc import Iterator

DEFAULT_SOCKET = "/var/run/l7proxy/agent.sock"
SOCKET_ENV = "L7PROXY_SOCKET"


def default_socket() -> str:
    return os.environ.get(SOCKET_ENV, DEFAULT_SOCKET)


def add_socket_arg(parser) -> None:
    parser.add_argument(
        "--socket",
        default=None,
        metavar="PATH",
        help=f"the agent's API socket (default ${SOCKET_ENV} or {DEFAULT_SOCKET})",
    )


def agent_action(parser, action, outputs: tuple[str, ...] = ()) -> None:
    """Make `parser` a command that talks to the agent: its --socket, an -o/--output choice when
    `outputs` are given (the first is the default), and `action(args)` run with `run`."""
    if outputs:
        parser.add_argument("-o", "--output", choices=outputs, default=outputs[0])
    add_socket_arg(parser)
    parser.set_defaults(func=lambda a: run(lambda: action(a)))


class AgentError(Exception):
    def __init__(self, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.details = details or []


class AgentUnavailable(AgentError):
    pass


class Client:
    def __init__(self, path: str | None = None, timeout: float | None = 60.0) -> None:
        self.path = path or default_socket()
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise AgentUnavailable(
                f"cannot reach the agent at {self.path}: {exc.strerror or exc} "
                "(start it with `l7proxy agent`, or pass --socket)"
            ) from None
        return sock

    def call(self, op: str, **args) -> object:
        sock = self._connect()
        with sock, sock.makefile("rwb") as stream:
            stream.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            stream.flush()
            line = stream.readline()
        if not line:
            raise AgentError(f"the agent closed the connection during {op}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise AgentError(answer.get("error", "unknown error"), answer.get("details"))
        return answer.get("result")

    def stream(self, op: str, **args) -> Iterator[dict]:
        """Lines of a streaming op. The first must come within the client's timeout (a stuck
        agent is an error, not a silent hang); after it the stream may idle for ever."""
        sock = self._connect()
        with sock, sock.makefile("rwb") as stream:
            stream.write(json.dumps({"op": op, "args": args}).encode() + b"\n")
            stream.flush()
            try:
                first = stream.readline()
            except TimeoutError:
                raise AgentError(f"the agent did not answer {op} within {self.timeout}s") from None
            if not first:
                raise AgentError(f"the agent closed the connection during {op}")
            sock.settimeout(None)
            for line in itertools.chain([first], stream):
                answer = json.loads(line)
                if answer.get("ok") is False:
                    raise AgentError(answer.get("error", "unknown error"), answer.get("details"))
                yield answer


def run(fn) -> int:
    """Run a CLI action that talks to the agent; print agent errors the way users expect."""
    try:
        return int(fn() or 0)
    except AgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        for line in exc.details:
            print(line, file=sys.stderr)
        return 1
