"""KafkaSession backpressure and bounds, with fake transports standing in for failing peers
(a client that never reads, a broker that never answers)."""

from __future__ import annotations

from l7proxy.config import ProxyConfig
from l7proxy.context import ConnContext, OriginalDestination
from l7proxy.flows import FlowSink
from l7proxy.kafka.layer import KafkaSettings
from l7proxy.kafka.session import MAX_IN_FLIGHT, KafkaSession
from policies.l7 import KafkaRuleSet
from policies.model import KafkaRule
from tests.unit.kafka.test_layer import produce, request, response


class FakeTransport:
    def __init__(self) -> None:
        self.written = bytearray()
        self.paused = False
        self.closed = False

    def write(self, data) -> None:
        self.written += data

    def writelines(self, items) -> None:
        for item in items:
            self.write(item)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True


def session(rules=None):
    from l7proxy.metrics import ProxyMetrics

    ctx = ConnContext(
        config=ProxyConfig(), client=("127.0.0.1", 1), listener_port=9092,
        destination=OriginalDestination("127.0.0.1", 9), source_identity=1, source_labels=(),
        destination_identity=2, destination_labels=(), rules=lambda: rules, flows=FlowSink(None),
        metrics=ProxyMetrics(), proto="kafka",
    )  # fmt: skip
    s = KafkaSession(ctx, KafkaSettings())
    s.client, s.upstream = FakeTransport(), FakeTransport()
    return s


def test_requests_in_flight_are_bounded():
    s = session()
    for cid in range(MAX_IN_FLIGHT + 1):
        s.data_received(request(0, 9, cid, produce(["t"])))
    assert s.client.paused  # the broker answers nothing: stop reading the client
    s.upstream_data(b"".join(response(0, 9, cid, {}) for cid in range(MAX_IN_FLIGHT // 2 + 1)))
    assert not s.client.paused


def test_client_that_does_not_read_its_answers_is_not_read_either():
    s = session(KafkaRuleSet([KafkaRule(api_keys=(0,), topic="t")]))
    s.pause_writing()  # the client's socket buffer is full
    assert s.client.paused and s.upstream.paused is True
    s.resume_writing()
    assert not s.client.paused and not s.upstream.paused


def test_two_reasons_to_pause_release_independently():
    s = session()
    s.pause_writing()
    s.pause_client()  # the broker is slow too
    s.resume_writing()
    assert s.client.paused  # still waiting for the broker's buffer to drain
    s.resume_client()
    assert not s.client.paused


def test_denials_are_answered_without_the_broker():
    s = session(KafkaRuleSet([KafkaRule(api_keys=(0,), topic="t")]))
    s.data_received(request(0, 9, 5, produce(["secret"])))
    assert not s.upstream.written
    assert int.from_bytes(s.client.written[4:8], "big") == 5


def test_large_produce_bodies_are_spliced_byte_for_byte_over_real_sockets():
    """Real loopback sockets under uvloop: the bodies of large allowed Produce requests go
    client -> broker through splice(2); the broker sees the exact stream, the client gets every
    answer in order, and a request that is not cut through still takes the normal path."""
    import asyncio

    import uvloop

    from l7proxy.metrics import ProxyMetrics
    from tests.unit.kafka.test_layer import PRODUCE_ONLY_T1, _big_produce

    cids = (1, 2, 3, 4)
    stream = b"".join(
        request(0, 9, 1, {**produce(["t1"]), "topic_data": [
            {"name": "t1", "partition_data": [{"index": 0, "records": b"R" * 900_000}]}]})
        if cid == 1 else _big_produce(["t1"], cid) if cid != 3 else request(0, 9, cid, produce(["t1"]))
        for cid in cids
    )  # fmt: skip
    answers = b"".join(response(0, 9, cid, {}) for cid in cids)

    async def main():
        loop = asyncio.get_running_loop()
        got = bytearray()
        done, lost = loop.create_future(), loop.create_future()

        class Broker(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                got.extend(data)
                if len(got) >= len(stream):
                    self.transport.write(answers)
                    done.set_result(None)

            def connection_lost(self, exc):
                lost.set_result(None)

        broker = await loop.create_server(Broker, "127.0.0.1", 0)
        sessions = []

        def factory():
            ctx = ConnContext(
                config=ProxyConfig(), client=("127.0.0.1", 1), listener_port=9092,
                destination=OriginalDestination("127.0.0.1", broker.sockets[0].getsockname()[1]),
                source_identity=1, source_labels=(), destination_identity=2, destination_labels=(),
                rules=lambda: PRODUCE_ONLY_T1, flows=FlowSink(None), metrics=ProxyMetrics(),
                proto="kafka",
            )  # fmt: skip
            ctx.proto_metrics.active.inc()
            sessions.append(KafkaSession(ctx, KafkaSettings()))
            return sessions[-1]

        proxy = await loop.create_server(factory, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.sockets[0].getsockname()[1]
        )
        for i in range(0, len(stream), 100_000):  # the client sends in pieces
            writer.write(stream[i : i + 100_000])
            await writer.drain()
            await asyncio.sleep(0)
        await asyncio.wait_for(done, 10)
        back = await asyncio.wait_for(reader.readexactly(len(answers)), 10)
        writer.close()
        # The proxy's dup()s of the sockets must not keep the broker connection open.
        await asyncio.wait_for(lost, 5)
        proxy.close()
        broker.close()
        return bytes(got), back, sessions[0]

    loop = uvloop.new_event_loop()
    try:
        got, back, sess = loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == stream
    assert back == answers
    assert sess.spliced_bytes > 500_000  # most of the 1.5 MB of bodies never entered Python
    assert sess.layer.in_flight == 0


def test_client_closing_in_the_middle_of_a_spliced_request_closes_the_broker_side():
    import asyncio

    import uvloop

    from l7proxy.metrics import ProxyMetrics
    from tests.unit.kafka.test_layer import PRODUCE_ONLY_T1

    big = request(0, 9, 1, {**produce(["t1"]), "topic_data": [
        {"name": "t1", "partition_data": [{"index": 0, "records": b"R" * 900_000}]}]})  # fmt: skip

    async def main():
        loop = asyncio.get_running_loop()
        got = bytearray()
        lost = loop.create_future()

        class Broker(asyncio.Protocol):
            def data_received(self, data):
                got.extend(data)

            def connection_lost(self, exc):
                lost.set_result(None)

        broker = await loop.create_server(Broker, "127.0.0.1", 0)
        sessions = []

        def factory():
            ctx = ConnContext(
                config=ProxyConfig(), client=("127.0.0.1", 1), listener_port=9092,
                destination=OriginalDestination("127.0.0.1", broker.sockets[0].getsockname()[1]),
                source_identity=1, source_labels=(), destination_identity=2, destination_labels=(),
                rules=lambda: PRODUCE_ONLY_T1, flows=FlowSink(None), metrics=ProxyMetrics(),
                proto="kafka",
            )  # fmt: skip
            ctx.proto_metrics.active.inc()
            sessions.append(KafkaSession(ctx, KafkaSettings()))
            return sessions[-1]

        proxy = await loop.create_server(factory, "127.0.0.1", 0)
        _, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
        writer.write(big[:100_000])
        await writer.drain()
        while len(got) < 100_000:  # the head went through and the rest is being spliced
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        writer.write(big[100_000:400_000])
        await writer.drain()
        writer.close()
        await asyncio.wait_for(lost, 5)
        proxy.close()
        broker.close()
        return bytes(got), sessions[0]

    loop = uvloop.new_event_loop()
    try:
        got, sess = loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == big[: len(got)] and len(got) <= 400_000
    assert sess.spliced_bytes > 0
    assert sess._closed and sess._splicer is None


def test_a_large_produce_sent_after_a_pause_is_spliced_from_its_head():
    """After a spliced request the proxy waits for the next request's head itself (the client
    transport stays paused), so a large request that arrives later is spliced from its first
    HEAD_READ bytes on instead of having its first 256 KiB read into Python by the transport.
    Closing the client while the proxy waits still closes the broker side."""
    import asyncio

    import uvloop

    from l7proxy.kafka.session import HEAD_READ
    from l7proxy.metrics import ProxyMetrics
    from tests.unit.kafka.test_layer import PRODUCE_ONLY_T1

    def big(cid):
        return request(0, 9, cid, {**produce(["t1"]), "topic_data": [
            {"name": "t1", "partition_data": [{"index": 0, "records": b"R" * 900_000}]}]})  # fmt: skip

    first, second, third = big(1), big(2), big(3)

    async def main():
        loop = asyncio.get_running_loop()
        got = bytearray()
        lost = loop.create_future()

        class Broker(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):
                before = len(got)
                got.extend(data)
                ends = (len(first), len(first + second), len(first + second + third))
                for cid, end in enumerate(ends, 1):
                    if before < end <= len(got):
                        self.transport.write(response(0, 9, cid, {}))

            def connection_lost(self, exc):
                lost.set_result(None)

        broker = await loop.create_server(Broker, "127.0.0.1", 0)
        sessions = []

        def factory():
            ctx = ConnContext(
                config=ProxyConfig(), client=("127.0.0.1", 1), listener_port=9092,
                destination=OriginalDestination("127.0.0.1", broker.sockets[0].getsockname()[1]),
                source_identity=1, source_labels=(), destination_identity=2, destination_labels=(),
                rules=lambda: PRODUCE_ONLY_T1, flows=FlowSink(None), metrics=ProxyMetrics(),
                proto="kafka",
            )  # fmt: skip
            ctx.proto_metrics.active.inc()
            sessions.append(KafkaSession(ctx, KafkaSettings()))
            return sessions[-1]

        proxy = await loop.create_server(factory, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.sockets[0].getsockname()[1]
        )
        answers = []
        for payload in (first, second, third):
            writer.write(payload)
            await writer.drain()
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 10), "big")
            answers.append(await reader.readexactly(size))
            await asyncio.sleep(0.05)  # the proxy now waits for the next head
        writer.close()
        await asyncio.wait_for(lost, 5)
        proxy.close()
        broker.close()
        return bytes(got), answers, sessions[0]

    loop = uvloop.new_event_loop()
    try:
        got, answers, sess = loop.run_until_complete(main())
    finally:
        loop.close()
    assert got == first + second + third
    assert [int.from_bytes(a[:4], "big") for a in answers] == [1, 2, 3]
    # The first request goes through the transport while the broker connection is made; of the
    # second, the transport's first read (up to 256 KiB) is not spliced; of the third, only its
    # head read. (Handing reading back to the transport after a request lost 256 KiB of each.)
    assert sess.spliced_bytes >= len(second) - 256 * 1024 + len(third) - HEAD_READ
    assert sess._closed and sess._splicer is None
