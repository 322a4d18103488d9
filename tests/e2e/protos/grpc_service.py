"""The Echo test service: compile echo.proto at test time and serve it with grpcio."""

from __future__ import annotations

import importlib
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

HERE = Path(__file__).resolve().parent
MAX_MESSAGE = 16 * 1024 * 1024
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.max_send_message_length", MAX_MESSAGE),
]


def compile_echo(out_dir: Path):
    """(echo_pb2, echo_pb2_grpc) generated into `out_dir` (a per-run temp dir)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(HERE / "echo.proto"),
        ],
        check=True,
    )
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
    return importlib.import_module("echo_pb2"), importlib.import_module("echo_pb2_grpc")


def make_servicer(pb2, pb2_grpc):
    class Echo(pb2_grpc.EchoServicer):
        def __init__(self) -> None:
            self.cancelled: list[str] = []
            self.calls: list[str] = []
            self.lock = threading.Lock()

        def _track(self, name: str) -> None:
            with self.lock:
                self.calls.append(name)

        def _cancelled(self, name: str) -> None:
            """The server saw the call end early (RST_STREAM CANCEL reached it)."""
            with self.lock:
                self.cancelled.append(name)

        def Unary(self, request, context):
            self._track("Unary")
            md = dict(context.invocation_metadata())
            if "x-client" in md:
                context.send_initial_metadata((("x-server-initial", "yes"),))
                context.set_trailing_metadata(
                    (
                        ("x-server-trailing", md["x-client"]),
                        ("x-echo-bin", md.get("x-client-bin", b"")),
                    )
                )
            if request.code:
                context.abort(grpc.StatusCode(_status_tuple(request.code)), request.text)
            return pb2.Msg(text=request.text, blob=request.blob, count=len(request.blob))

        def ClientStream(self, request_iterator, context):
            self._track("ClientStream")
            texts = []
            total = 0
            for msg in request_iterator:
                texts.append(msg.text)
                total += len(msg.blob)
            return pb2.Msg(text=",".join(texts), count=total)

        def ServerStream(self, request, context):
            self._track("ServerStream")
            finished = []
            context.add_callback(lambda: finished or self._cancelled("ServerStream"))
            for i in range(request.count):
                yield pb2.Msg(text=f"{request.text}-{i}", count=i)
                if request.seconds:
                    time.sleep(request.seconds)
            finished.append(True)

        def Bidi(self, request_iterator, context):
            self._track("Bidi")
            for msg in request_iterator:
                yield pb2.Msg(text=f"pong {msg.text}", count=msg.count)

        def Secret(self, request, context):
            self._track("Secret")
            return pb2.Msg(text="the secret")

        def Sleep(self, request, context):
            self._track("Sleep")
            end = time.monotonic() + request.seconds
            while time.monotonic() < end:
                if not context.is_active():
                    self._cancelled("Sleep")
                    return pb2.Msg()
                time.sleep(0.02)
            return pb2.Msg(text="woke up")

    return Echo()


def _status_tuple(code: int):
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status.value
    raise ValueError(code)


class EchoServer:
    def __init__(self, pb2, pb2_grpc) -> None:
        self.servicer = make_servicer(pb2, pb2_grpc)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=OPTIONS)
        pb2_grpc.add_EchoServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None)
