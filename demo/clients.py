"""The demo's clients, one run per check, each printing what it saw on one line:

    python -m demo.clients produce BOOTSTRAP TOPIC VALUE    produced | refused: <error>
    python -m demo.clients consume BOOTSTRAP TOPIC          read [...] | read nothing ... | refused: ...
    python -m demo.clients grpc TARGET METHOD               the answer (exit 0) | CODE: details (exit 3)
    python -m demo.clients probe HOST PORT                  waits until HOST:PORT accepts (exit 1: never)

In node mode they run inside the client endpoint's namespace, so the agent sees them with that
endpoint's identity; in gateway mode on loopback, through the listener that names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

from demo.procs import wait_port


async def produce(bootstrap: str, topic: str, value: bytes) -> str:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await producer.start()
        await asyncio.wait_for(producer.send_and_wait(topic, value), 8)
        return "produced"
    except (KafkaError, TimeoutError) as exc:
        return f"refused: {type(exc).__name__}"
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()


async def consume(bootstrap: str, topic: str) -> str:
    """Read `topic` from the beginning. The consumer is given its topic (not assign()): a topic
    the policy denies then fails at start with TopicAuthorizationFailed after one Metadata
    request, where assign() made aiokafka ask again every fetcher turn (2,146 denied requests in
    4 s, docs/kafka.md)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        request_timeout_ms=5000,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )

    async def read() -> list[str]:
        await consumer.start()
        values: list[str] = []
        while not values:  # the partition is assigned after the first metadata answer
            batch = await consumer.getmany(timeout_ms=500)
            values = [m.value.decode() for records in batch.values() for m in records]
        return values

    try:
        values = await asyncio.wait_for(read(), 6)
        return f"read {values}"
    except TimeoutError:
        return "read nothing within 6 s"
    except KafkaError as exc:
        return f"refused: {type(exc).__name__}"
    finally:
        with contextlib.suppress(Exception):
            await consumer.stop()


def call_door(target: str, method: str) -> tuple[str, bool]:
    import grpc

    from demo.doors import SERVICE

    with grpc.insecure_channel(target) as channel:
        stub = channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            return stub(b"door-42", timeout=5).decode(), True
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}", False


def main(argv: list[str]) -> int:
    what, *rest = argv or [""]
    if what == "produce" and len(rest) == 3:
        print(asyncio.run(produce(rest[0], rest[1], rest[2].encode())), flush=True)
    elif what == "consume" and len(rest) == 2:
        print(asyncio.run(consume(rest[0], rest[1])), flush=True)
    elif what == "grpc" and len(rest) == 2:
        text, ok = call_door(rest[0], rest[1])
        print(text, flush=True)
        return 0 if ok else 3
    elif what == "probe" and len(rest) == 2:
        try:
            wait_port(rest[0], int(rest[1]))
        except RuntimeError as exc:
            print(exc, flush=True)
            return 1
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
