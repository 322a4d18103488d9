"""The gRPC backend of the benchmarks: a grpc.aio server that echoes l7bench.Payload.

grpc_server.py GEN_DIR PORT    GEN_DIR holds l7bench_pb2*.py compiled at test time
"""

from __future__ import annotations

import asyncio
import sys

import grpc


def main(gen_dir: str, port: int) -> None:
    sys.path.insert(0, gen_dir)
    import l7bench_pb2
    import l7bench_pb2_grpc

    class Bench(l7bench_pb2_grpc.BenchServicer):
        async def Unary(self, request, context):
            return l7bench_pb2.Payload(data=request.data)

        async def Private(self, request, context):
            return l7bench_pb2.Payload(data=request.data)

    async def serve() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        l7bench_pb2_grpc.add_BenchServicer_to_server(Bench(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(serve())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
