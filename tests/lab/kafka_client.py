"""A Kafka client for a lab pod: produce one record to each topic given and print one line per
topic, `TOPIC produced` or `TOPIC refused ERROR` (the Kafka error aiokafka raised).
`python kafka_client.py BOOTSTRAP TOPIC [TOPIC...]` inside an endpoint."""

from __future__ import annotations

import asyncio
import sys


async def produce(bootstrap: str, topic: str) -> str:
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await asyncio.wait_for(producer.start(), 10)
        await asyncio.wait_for(producer.send_and_wait(topic, b"from another node"), 10)
        return f"{topic} produced"
    except (KafkaError, TimeoutError) as exc:
        return f"{topic} refused {type(exc).__name__}"
    finally:
        try:
            await asyncio.wait_for(producer.stop(), 5)
        except Exception:  # noqa: BLE001 (a failed start leaves nothing to stop)
            pass


def main() -> None:
    bootstrap, *topics = sys.argv[1:]
    for topic in topics:
        print(asyncio.run(produce(bootstrap, topic)), flush=True)


if __name__ == "__main__":
    main()
