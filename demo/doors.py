"""Cloud City's DoorManager: a gRPC service with raw-bytes messages (no .proto needed).

`python -m demo.doors HOST PORT` prints `listening` once it serves, then serves until killed.
"""

from __future__ import annotations

import sys
from concurrent import futures

import grpc

SERVICE = "cloudcity.DoorManager"
ANSWERS = {
    "GetName": b"Door 42: Cloud City, carbon-freeze chamber",
    "GetLocation": b"Level 3, sector 5",
    "RequestMaintenance": b"Maintenance requested",
    "SetAccessCode": b"Access code changed",
    "GetState": b"Locked",
}


def _method(answer: bytes) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(lambda request, context: answer)


def serve(host: str, port: int) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {name: _method(answer) for name, answer in ANSWERS.items()}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    server.add_insecure_port(f"{host}:{port}")
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m demo.doors HOST PORT", file=sys.stderr)
        return 2
    serve(argv[0], int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
