"""KafkaSession backpressure and bounds, with fake transports standing in for failing peers
(a client that never reads, a broker that never answers)."""

from __future__ import annotations

from l7proxy.config import ProxyConfig
from l7proxy.context import ConnContext, OriginalDestination
from l7proxy.flows import FlowSink
from l7proxy.kafka.layer import KafkaSettings
from l7proxy.kafka.session import MAX_IN_FLIGHT, KafkaSession
from l7proxy.session import PauseReason, Session
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


def _ctx(rules, broker_port: int = 9) -> ConnContext:
    from l7proxy.metrics import ProxyMetrics

    return ConnContext(
        config=ProxyConfig(), client=("127.0.0.1", 1), listener_port=9092,
        destination=OriginalDestination("127.0.0.1", broker_port), source_identity=1,
        source_labels=(), destination_identity=2, destination_labels=(), rules=lambda: rules,
        flows=FlowSink(None), metrics=ProxyMetrics(), proto="kafka",
    )  # fmt: skip


def _session_factory(broker, sessions: list):
    """Protocol factory for a proxy listener in front of `broker` (an asyncio server); the
    sessions it makes are appended to `sessions`."""
    from tests.unit.kafka.test_layer import PRODUCE_ONLY_T1

    port = broker.sockets[0].getsockname()[1]

    def factory():
        ctx = _ctx(PRODUCE_ONLY_T1, port)
        ctx.proto_metrics.active.inc()
        sessions.append(KafkaSession(ctx, KafkaSettings()))
        return sessions[-1]

    return factory


def _big_request(cid: int) -> bytes:
    return request(0, 9, cid, {**produce(["t1"]), "topic_data": [
        {"name": "t1", "partition_data": [{"index": 0, "records": b"R" * 900_000}]}]})  # fmt: skip


def _run_uvloop(coro):
    """Run `coro` on a fresh uvloop loop (the event loop the proxy runs on) and close it."""
    import uvloop

    loop = uvloop.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def session(rules=None):
    s = KafkaSession(_ctx(rules), KafkaSettings())
    s.transport, s.upstream = FakeTransport(), FakeTransport()
    return s


def test_requests_in_flight_are_bounded():
    s = session()
    for cid in range(MAX_IN_FLIGHT + 1):
        s.data_received(request(0, 9, cid, produce(["t"])))
    assert s.transport.paused  # the broker answers nothing: stop reading the client
    s.upstream_data(b"".join(response(0, 9, cid, {}) for cid in range(MAX_IN_FLIGHT // 2 + 1)))
    assert not s.transport.paused


def test_client_that_does_not_read_its_answers_is_not_read_either():
    s = session(KafkaRuleSet([KafkaRule(api_keys=(0,), topic="t")]))
    s.pause_writing()  # the client's socket buffer is full
    assert s.transport.paused and s.upstream.paused is True
    s.resume_writing()
    assert not s.transport.paused and not s.upstream.paused


def test_two_reasons_to_pause_release_independently():
    s = session()
    assert isinstance(s, Session)  # the core's contract (l7proxy/session.py)
    s.pause_writing()
    s.pause_client_reading(PauseReason.UPSTREAM_FULL)  # the broker is slow too
    assert s.paused == PauseReason.CLIENT_FULL | PauseReason.UPSTREAM_FULL
    s.resume_writing()
    assert s.transport.paused  # still waiting for the broker's buffer to drain
    s.resume_client_reading(PauseReason.UPSTREAM_FULL)
    assert not s.transport.paused


def test_denials_are_answered_without_the_broker():
    s = session(KafkaRuleSet([KafkaRule(api_keys=(0,), topic="t")]))
    s.data_received(request(0, 9, 5, produce(["secret"])))
    assert not s.upstream.written
    assert int.from_bytes(s.transport.written[4:8], "big") == 5


def test_large_produce_bodies_are_spliced_byte_for_byte_over_real_sockets():
    """Real loopback sockets under uvloop: the bodies of large allowed Produce requests go
    client -> broker through splice(2); the broker sees the exact stream, the client gets every
    answer in order, and a request that is not cut through still takes the normal path. The
    proxy's dup()s of the sockets must not keep the broker connection open (the rig waits for
    the broker to see the close)."""
    import asyncio

    from tests.unit.kafka.test_layer import _big_produce

    cids = (1, 2, 3, 4)
    stream = b"".join(
        _big_request(1) if cid == 1
        else _big_produce(["t1"], cid) if cid != 3 else request(0, 9, cid, produce(["t1"]))
        for cid in cids
    )  # fmt: skip
    answers = b"".join(response(0, 9, cid, {}) for cid in cids)

    async def client(reader, writer, got):
        for i in range(0, len(stream), 100_000):  # the client sends in pieces
            writer.write(stream[i : i + 100_000])
            await writer.drain()
            await asyncio.sleep(0)
        return await asyncio.wait_for(reader.readexactly(len(answers)), 10)

    got, back, sess = _splice_rig(client)
    assert got == stream
    assert back == answers
    assert sess.spliced_bytes > 500_000  # most of the 1.5 MB of bodies never entered Python
    assert sess.layer.in_flight == 0


def test_client_closing_in_the_middle_of_a_spliced_request_closes_the_broker_side():
    import asyncio

    big = _big_request(1)

    async def client(reader, writer, got):
        writer.write(big[:100_000])
        await writer.drain()
        while len(got) < 100_000:  # the head went through and the rest is being spliced
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        writer.write(big[100_000:400_000])
        await writer.drain()
        # returning closes the client; the rig waits until the broker side is closed too

    got, _, sess = _splice_rig(client)
    assert got == big[: len(got)] and len(got) <= 400_000
    assert sess.spliced_bytes > 0
    assert sess.closed and sess._splicer is None


def _splice_rig(client):
    """A uvloop proxy session between real loopback sockets: a broker that records what it gets
    and answers each complete request, and `client(reader, writer, got)` driving the client side
    (`got`: the broker's bytes so far). Returns (bytes the broker got, the client's result, the
    session) once both sides closed."""
    import asyncio

    from parsers.kafka.frames import FrameDecoder

    async def main():
        loop = asyncio.get_running_loop()
        got = bytearray()
        lost = loop.create_future()

        class Broker(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.frames = FrameDecoder(8 << 20)

            def data_received(self, data):
                got.extend(data)
                for framed in self.frames.receive_data(data):
                    cid = int.from_bytes(framed[8:12], "big")
                    self.transport.write(response(0, 9, cid, {}))

            def connection_lost(self, exc):
                lost.set_result(None)

        broker = await loop.create_server(Broker, "127.0.0.1", 0)
        sessions = []

        proxy = await loop.create_server(_session_factory(broker, sessions), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", proxy.sockets[0].getsockname()[1]
        )
        result = await client(reader, writer, got)
        writer.close()
        await asyncio.wait_for(lost, 5)
        proxy.close()
        broker.close()
        return bytes(got), result, sessions[0]

    return _run_uvloop(main())


async def _send_and_read_answer(reader, writer, payload: bytes) -> int:
    import asyncio

    writer.write(payload)
    await writer.drain()
    size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 10), "big")
    return int.from_bytes((await reader.readexactly(size))[:4], "big")


def test_a_large_produce_sent_after_a_pause_is_spliced_from_its_head():
    """After a spliced request the proxy waits for the next request's head itself (the client
    transport stays paused), so a large request that arrives later is spliced from its first
    HEAD_READ bytes on instead of having its first 256 KiB read into Python by the transport.
    Closing the client while the proxy waits still closes the broker side."""
    import asyncio

    from l7proxy.kafka.session import HEAD_READ

    first, second, third = _big_request(1), _big_request(2), _big_request(3)

    async def client(reader, writer, got):
        answers = []
        for payload in (first, second, third):
            answers.append(await _send_and_read_answer(reader, writer, payload))
            await asyncio.sleep(0.05)  # the proxy now waits for the next head
        return answers

    got, answers, sess = _splice_rig(client)
    assert got == first + second + third
    assert answers == [1, 2, 3]
    # The first request goes through the transport while the broker connection is made; of the
    # second, the transport's first read (up to 256 KiB) is not spliced; of the third, only its
    # head read. (Handing reading back to the transport after a request lost 256 KiB of each.)
    assert sess.spliced_bytes >= len(second) - 256 * 1024 + len(third) - HEAD_READ
    assert sess.closed and sess._splicer is None


def test_a_request_forwarded_from_a_head_read_reaches_the_broker_before_a_close():
    """The head the proxy reads after a spliced request is held to go into the pipe with the
    body; when the same read ends in a frame that closes the connection, what was forwarded
    before it still reaches the broker, as it did through the transport."""
    import asyncio

    small = request(0, 9, 3, produce(["t1"]))
    # API key 999 has no parser and the policy restricts Kafka: `unsupported_api`, closed.
    body = (999).to_bytes(2, "big") + bytes(2) + (4).to_bytes(4, "big") + b"\x00\x03app"
    unknown_api = len(body).to_bytes(4, "big") + body

    async def client(reader, writer, got):
        answers = [await _send_and_read_answer(reader, writer, _big_request(cid)) for cid in (1, 2)]
        await asyncio.sleep(0.05)  # the proxy now waits for the next head
        writer.write(small + unknown_api)  # the proxy closes on the second
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)  # the proxy closes the client side
        return answers

    got, answers, sess = _splice_rig(client)
    assert answers == [1, 2]
    assert got == _big_request(1) + _big_request(2) + small
    assert sess.closed


class _CountingLoop:
    """Stands in for the splicer's event loop: counts watcher calls, passes them on."""

    def __init__(self, loop, counts: dict) -> None:
        self._loop, self.counts = loop, counts

    def __getattr__(self, name):
        method = getattr(self._loop, name)
        if name not in ("add_reader", "remove_reader", "add_writer", "remove_writer"):
            return method

        def counted(*args):
            self.counts[name] = self.counts.get(name, 0) + 1
            return method(*args)

        return counted


def test_a_spliced_stream_keeps_its_client_watcher_and_does_not_retry_into_eagain(monkeypatch):
    """A client that sends its large requests in pieces makes the proxy wait for it many times.
    The splicer's watcher on the client socket stays registered across those waits and across
    requests (adding and removing it cost a poll handle, an ioctl and epoll_ctl calls per wait),
    and a short splice from the client means the socket is empty: the proxy waits instead of
    calling splice again into EAGAIN (a BlockingIOError per call)."""
    import asyncio
    import os as real_os
    import types

    from l7proxy import splice as splicer_mod

    counts: dict = {}
    eagain = [0]
    init = splicer_mod.Splicer.__init__

    def counting_init(self, *args):
        init(self, *args)
        self.loop = _CountingLoop(self.loop, counts)

    def splice(src, dst, count, *args, **kwargs):
        try:
            return real_os.splice(src, dst, count, *args, **kwargs)
        except BlockingIOError:
            eagain[0] += 1
            raise

    monkeypatch.setattr(splicer_mod.Splicer, "__init__", counting_init)
    monkeypatch.setattr(
        splicer_mod, "os", types.SimpleNamespace(**{**vars(real_os), "splice": splice})
    )
    payloads = [_big_request(cid) for cid in (1, 2, 3, 4)]

    async def client(reader, writer, got):
        answers = []
        for payload in payloads:
            for i in range(0, len(payload), 50_000):  # a wait on the proxy side for each piece
                writer.write(payload[i : i + 50_000])
                await writer.drain()
                await asyncio.sleep(0.002)
            size = int.from_bytes(await asyncio.wait_for(reader.readexactly(4), 10), "big")
            answers.append(int.from_bytes((await reader.readexactly(size))[:4], "big"))
        return answers

    got, answers, sess = _splice_rig(client)
    assert got == b"".join(payloads)
    assert answers == [1, 2, 3, 4]
    assert sess.spliced_bytes > 2_000_000
    # The reader is dropped only for a wait on the broker side (an unread client socket would
    # wake a level-triggered watcher in a loop) and when reading goes back to the transport.
    assert counts.get("add_reader", 0) <= 2 + counts.get("add_writer", 0), counts
    assert eagain[0] <= 2, eagain


def test_topic_id_lookups_pause_the_client_and_run_one_after_another(monkeypatch):
    """Two Fetch requests by two unknown topic ids: the first waits for a lookup (client
    paused), then the second needs its own; the client stays paused until that one is over
    too, and both go upstream in order."""
    import asyncio

    import l7proxy.kafka.resolve as resolve_module
    from tests.unit.kafka.test_layer import _fetch_by_id

    answers = {bytes([1]) * 16: "t1", bytes([2]) * 16: "t2"}
    asked: list[asyncio.Future] = []

    async def scripted_lookup(host, port, max_bytes):
        asked.append(asyncio.get_running_loop().create_future())
        return await asked[-1]

    monkeypatch.setattr(resolve_module, "lookup_topic_ids", scripted_lookup)
    rules = KafkaRuleSet([KafkaRule(api_keys=(1, 3, 18), topic="t1"),
                          KafkaRule(api_keys=(1,), topic="t2")])  # fmt: skip
    first, second = _fetch_by_id(1, bytes([1]) * 16), _fetch_by_id(2, bytes([2]) * 16)

    async def turns():
        for _ in range(20):  # the lookup tasks (shared, wait_for, shield) and their callbacks
            await asyncio.sleep(0)

    async def main():
        s = session(rules)
        s.data_received(first + second)
        await turns()
        assert len(asked) == 1 and s.transport.paused and not s.upstream.written
        asked[0].set_result({bytes([1]) * 16: "t1"})
        await turns()
        assert bytes(s.upstream.written) == first
        assert len(asked) == 2 and s.transport.paused  # the second lookup holds the client
        asked[1].set_result(answers)
        await turns()
        assert bytes(s.upstream.written) == first + second and not s.transport.paused
        assert s.layer.in_flight == 2

    _run_uvloop(main())


def test_the_sessions_of_one_worker_share_its_kafka_state():
    """One KafkaWorker per worker, kept by the worker's sweeper: the topic id map learned on one
    connection serves the others (the client's Metadata and Fetch often use two connections).
    Without a sweeper a session has its own."""
    from l7proxy.server import DeadlineSweeper

    sweeper = DeadlineSweeper()
    ctx_a, ctx_b = _ctx(None), _ctx(None)
    ctx_a.sweeper = ctx_b.sweeper = sweeper
    a, b = KafkaSession(ctx_a), KafkaSession(ctx_b)
    assert a.worker is b.worker and a.layer.topic_names is b.layer.topic_names
    a.layer.learn_topic_ids({bytes([7]) * 16: "t7"})
    assert b.layer.topic_names[bytes([7]) * 16] == "t7"
    alone = KafkaSession(_ctx(None))
    assert alone.worker is not a.worker and not alone.layer.topic_names
