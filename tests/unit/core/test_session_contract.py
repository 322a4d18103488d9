"""The session contract (l7proxy/session.py): pause reasons combine, and the one drain loop."""

import asyncio

from l7proxy.http1.session import Http1Session
from l7proxy.http2.session import H2Session
from l7proxy.session import PauseReason, Session, drain_sessions


class _Transport:
    def __init__(self) -> None:
        self.reading = True
        self.calls = []

    def pause_reading(self) -> None:
        self.calls.append("pause")
        self.reading = False

    def resume_reading(self) -> None:
        self.calls.append("resume")
        self.reading = True


class _Fake(Session):
    __slots__ = ("drained", "shut", "fails")

    def __init__(self, fails: bool = False) -> None:
        super().__init__()
        self.transport = _Transport()
        self.drained = self.shut = False
        self.fails = fails

    def drain(self) -> None:
        self.drained = True
        if self.fails:
            raise RuntimeError("broken session")

    def close(self) -> None:
        self.shut = True


def test_reading_resumes_when_the_last_reason_is_released():
    s = Session()
    s.transport = _Transport()
    s.pause_client_reading(PauseReason.UPSTREAM_FULL)
    s.pause_client_reading(PauseReason.CONNECTING)
    assert s.transport.calls == ["pause"] and s.paused == 5 and type(s.paused) is int
    s.resume_client_reading(PauseReason.UPSTREAM_FULL)
    assert not s.transport.reading
    s.resume_client_reading(PauseReason.UPSTREAM_FULL)  # not held: nothing happens
    assert s.transport.calls == ["pause"]
    s.resume_client_reading(PauseReason.CONNECTING | PauseReason.UPGRADE)
    assert s.transport.calls == ["pause", "resume"] and s.paused == 0


def test_a_closed_session_does_not_touch_its_transport():
    s = Session()
    s.transport = _Transport()
    s.closed = True
    s.pause_client_reading(PauseReason.REQUEST_QUEUE)
    s.resume_client_reading(PauseReason.REQUEST_QUEUE)
    assert s.transport.calls == [] and s.paused == 0


def test_protocol_sessions_keep_the_contract():
    for cls in (Http1Session, H2Session):
        assert issubclass(cls, Session)
        for name in ("on_deadline", "drain", "close"):
            assert getattr(cls, name) is not getattr(Session, name), (cls, name)
    assert not hasattr(Http1Session(_ctx()), "__dict__")  # slotted: idle connections stay small


def _ctx():
    from l7proxy.config import ProxyConfig
    from l7proxy.context import ConnContext, OriginalDestination
    from l7proxy.flows import FlowSink
    from l7proxy.metrics import ProxyMetrics

    return ConnContext(
        config=ProxyConfig(),
        client=("127.0.0.1", 1),
        listener_port=80,
        destination=OriginalDestination("127.0.0.1", 2),
        source_identity=2,
        source_labels=(),
        destination_identity=3,
        destination_labels=(),
        rules=lambda: None,
        flows=FlowSink(None),
        metrics=ProxyMetrics(),
        proto="http",
    ).for_proto("http")


def test_drain_waits_for_sessions_then_closes_the_rest():
    async def run():
        sessions: set = set()
        quick, slow, broken = _Fake(), _Fake(), _Fake(fails=True)
        sessions.update((quick, slow, broken))
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, sessions.discard, quick)  # finished its request in flight
        closed = await drain_sessions(sessions, 0.2)
        return quick, slow, broken, closed

    quick, slow, broken, closed = asyncio.run(run())
    assert quick.drained and slow.drained and broken.drained
    assert not quick.shut and slow.shut and broken.shut  # a failing drain() stops nothing
    assert closed == 2


def test_drain_returns_as_soon_as_every_session_is_gone():
    async def run():
        sessions: set = set()
        s = _Fake()
        sessions.add(s)
        asyncio.get_running_loop().call_later(0.01, sessions.clear)
        start = asyncio.get_running_loop().time()
        closed = await drain_sessions(sessions, 30)
        return closed, asyncio.get_running_loop().time() - start

    closed, took = asyncio.run(run())
    assert closed == 0 and took < 5
