"""The proxy's own topic-id lookup (l7proxy.kafka.resolve): the request it sends, the answer it
reads, and what it refuses. The real-broker side is in tests/e2e/test_kafka_tansu.py."""

from __future__ import annotations

import asyncio
import struct

import pytest

from l7proxy.kafka.resolve import lookup_topic_ids, metadata_request, topic_ids_of
from parsers.kafka.codec import DecodeError
from tests.unit.kafka.samples import kafka_python_classes
from tests.unit.kafka.test_layer import _metadata_response

REQUESTS, _ = kafka_python_classes()


def test_the_request_is_metadata_v12_for_every_topic():
    framed = metadata_request()
    assert struct.unpack(">i", framed[:4])[0] == len(framed) - 4
    key, version, cid, n = struct.unpack(">hhih", framed[4:14])
    assert (key, version) == (3, 12)
    body = framed[14 + n + 1 :]  # client id, then the header's empty tagged fields
    decoded = REQUESTS[3].decode(body, version=12).to_dict()
    assert decoded["topics"] is None and decoded["allow_auto_topic_creation"] is False


def _answer(cid=1):
    framed = _metadata_response(12, ["orders", "audit"])
    return framed[:4] + struct.pack(">i", cid) + framed[8:]


def test_the_answer_gives_every_topic_id():
    assert topic_ids_of(_answer()[4:]) == {bytes([1]) * 16: "orders", bytes([2]) * 16: "audit"}


def test_an_answer_to_something_else_is_refused():
    with pytest.raises(ValueError, match="not the answer"):
        topic_ids_of(_answer(cid=7)[4:])
    with pytest.raises((DecodeError, IndexError, ValueError)):
        topic_ids_of(_answer()[4:40])


async def _serve_once(reply: bytes):
    """A listener that reads one request frame and writes `reply`; (server, port, requests)."""
    seen = []

    async def handle(reader, writer):
        size = struct.unpack(">i", await reader.readexactly(4))[0]
        seen.append(await reader.readexactly(size))
        writer.write(reply)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], seen


def test_lookup_over_a_socket():
    async def main():
        server, port, seen = await _serve_once(_answer())
        async with server:
            ids = await asyncio.wait_for(lookup_topic_ids("127.0.0.1", port, 1 << 20), 5)
        return ids, seen

    ids, seen = asyncio.run(main())
    assert set(ids.values()) == {"orders", "audit"}
    assert seen == [metadata_request()[4:]]


@pytest.mark.parametrize(
    "reply",
    [struct.pack(">i", 1 << 30), struct.pack(">i", -1), b""],
    ids=["huge", "negative", "eof"],
)
def test_lookup_refuses_a_bad_answer(reply):
    async def main():
        server, port, _ = await _serve_once(reply)
        async with server:
            await asyncio.wait_for(lookup_topic_ids("127.0.0.1", port, 1 << 20), 5)

    with pytest.raises((ValueError, asyncio.IncompleteReadError)):
        asyncio.run(main())


def test_the_lookup_connects_through_the_loop_with_the_marked_host():
    """In the transparent modes the agent's loop sets SO_MARK (the client's identity) from the
    MarkedHost; the lookup's connection must reach it the same way as the session's upstream."""
    from l7proxy.agent.loop import MarkedHost, MarkingLoop

    seen = []

    class Recording(MarkingLoop):
        async def create_connection(self, factory, host=None, port=None, **kw):
            seen.append((host, getattr(host, "mark", None), port))
            raise ConnectionRefusedError("recorded")

    loop = Recording()
    try:
        with pytest.raises(ConnectionRefusedError):
            loop.run_until_complete(lookup_topic_ids(MarkedHost("10.0.0.7", 0x0A00), 9092, 1024))
    finally:
        loop.close()
    assert seen == [("10.0.0.7", 0x0A00, 9092)]


def test_lookups_at_the_same_time_share_one_and_a_finished_one_is_not_reused(monkeypatch):
    import l7proxy.kafka.resolve as resolve

    calls = []

    async def counted(host, port, max_bytes):
        calls.append((host, port))
        await asyncio.sleep(0.01)
        return {bytes([len(calls)]) * 16: f"t{len(calls)}"}

    monkeypatch.setattr(resolve, "lookup_topic_ids", counted)

    lookups = resolve.SharedLookups()

    async def main():
        together = [lookups.lookup("10.0.0.1", 9092, 1024, 5) for _ in range(5)]
        waiter = asyncio.ensure_future(lookups.lookup("10.0.0.1", 9092, 1024, 5))
        await asyncio.sleep(0)
        waiter.cancel()  # one session closes: the others still get the answer
        first = await asyncio.gather(*together)
        other_broker = await lookups.lookup("10.0.0.2", 9092, 1024, 5)
        again = await lookups.lookup("10.0.0.1", 9092, 1024, 5)
        return first, other_broker, again

    first, other_broker, again = asyncio.run(main())
    assert calls == [("10.0.0.1", 9092), ("10.0.0.2", 9092), ("10.0.0.1", 9092)]
    assert all(answer == {bytes([1]) * 16: "t1"} for answer in first)
    assert other_broker == {bytes([2]) * 16: "t2"} and again == {bytes([3]) * 16: "t3"}
    assert lookups.in_flight == {}


def test_a_shared_lookup_that_hangs_times_out(monkeypatch):
    import l7proxy.kafka.resolve as resolve

    async def hangs(host, port, max_bytes):
        await asyncio.sleep(60)

    monkeypatch.setattr(resolve, "lookup_topic_ids", hangs)
    lookups = resolve.SharedLookups()
    with pytest.raises(TimeoutError):
        asyncio.run(lookups.lookup("10.0.0.1", 9092, 1024, 0.05))
    assert lookups.in_flight == {}
