"""Ask the broker which topics some topic ids name: one Metadata request for all topics on a
connection of the proxy's own (see commands.ResolveTopicIds).

Needed because the id -> name map is learned from the Metadata responses a proxy process sees,
and a client's Metadata may have gone through another process: with `--workers N` the kernel
spreads a client's connections over the workers, so the worker that gets librdkafka's Fetch (by
topic id since v13) often never saw the Metadata that named the topic.
"""

from __future__ import annotations

import asyncio
import struct

from parsers.kafka.apis import API_TABLE
from parsers.kafka.frames import frame, response_header_size
from parsers.kafka.keys import METADATA
from parsers.kafka.responses import rewrite_metadata

# Metadata v12 (Kafka 3.0) carries topic ids; a broker that takes topic ids in requests (Fetch
# v13, Kafka 3.1) answers it.
VERSION = 12
CLIENT_ID = b"l7proxy-topic-ids"
_CORRELATION_ID = 1


def metadata_request() -> bytes:
    """The framed request: every topic, no auto-creation."""
    out = bytearray(struct.pack(">hhih", METADATA, VERSION, _CORRELATION_ID, len(CLIENT_ID)))
    out += CLIENT_ID
    out.append(0)  # request header v2: no tagged fields
    API_TABLE[METADATA].request_codec(VERSION).encode(
        out,
        {
            "topics": None,
            "allow_auto_topic_creation": False,
            "include_topic_authorized_operations": False,
        },
    )
    return frame(out)


def topic_ids_of(response: bytes) -> dict[bytes, str]:
    """id -> name from a Metadata v12 response frame without its size prefix."""
    if len(response) < 5 or struct.unpack_from(">i", response)[0] != _CORRELATION_ID:
        raise ValueError("not the answer to the topic id lookup")
    start = response_header_size(METADATA, True, response, 4)  # header v1: tagged fields
    return rewrite_metadata(response[start:], VERSION, None).topic_ids


async def lookup_topic_ids(host: str, port: int, max_bytes: int) -> dict[bytes, str]:
    """Connect, ask, read one answer of at most `max_bytes`, close. Raises OSError, ValueError
    or the codec's errors; the caller bounds the time. `host` is the session's upstream host as
    it is: in the transparent modes a MarkedHost, so the agent's loop marks this connection with
    the client's identity like the session's own upstream (asyncio.open_connection hands it to
    loop.create_connection unchanged)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(metadata_request())
        size = struct.unpack(">i", await reader.readexactly(4))[0]
        if not 0 < size <= max_bytes:
            raise ValueError(f"Metadata answer of {size} bytes")
        return topic_ids_of(await reader.readexactly(size))
    finally:
        writer.close()


class SharedLookups:
    """The lookups in flight of one worker, by event loop, broker address and socket mark:
    sessions that miss at the same moment (every consumer's Fetch after a worker restart) share
    one. Owned by the worker's KafkaWorker (l7proxy/kafka/worker.py)."""

    __slots__ = ("in_flight",)

    def __init__(self) -> None:
        self.in_flight: dict[tuple, asyncio.Future] = {}

    async def lookup(self, host: str, port: int, max_bytes: int, timeout: float) -> dict:
        """`lookup_topic_ids`, bounded by `timeout`, shared with every session that asks the
        same broker while it runs. A waiter that gives up (its session closed) does not cancel
        it for the others."""
        in_flight = self.in_flight
        key = (asyncio.get_running_loop(), str(host), getattr(host, "mark", 0), port)
        task = in_flight.get(key)
        if task is None or task.done():  # a finished one is an old answer: ask again
            task = asyncio.ensure_future(
                asyncio.wait_for(lookup_topic_ids(host, port, max_bytes), timeout)
            )
            in_flight[key] = task

            def forget(done: asyncio.Future) -> None:
                if in_flight.get(key) is done:
                    del in_flight[key]
                if not done.cancelled():
                    done.exception()  # retrieved: every waiter may have given up

            task.add_done_callback(forget)
        return await asyncio.shield(task)
