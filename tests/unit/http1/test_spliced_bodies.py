"""HTTP/1 bodies through splice(2) (l7proxy/http1/bodies.py), on real loopback sockets: the
session runs on a uvloop loop in a thread, a scripted backend and a blocking client in the test.
The pumps are counted, so each test knows the body went through the pipe, not Python."""

from __future__ import annotations

import asyncio
import io
import socket
import threading
import time

import pytest
import uvloop

from l7proxy.config import ProxyConfig
from l7proxy.context import ConnContext, OriginalDestination
from l7proxy.flows import FlowSink
from l7proxy.http1 import bodies
from l7proxy.http1.session import Http1Session
from l7proxy.http1.upstream import UpstreamPool
from l7proxy.metrics import ProxyMetrics
from l7proxy.server import DeadlineSweeper
from tests.unit.http1.playbook import PathRules

pytestmark = pytest.mark.skipif(not bodies.AVAILABLE, reason="os.splice needs Linux, Python 3.10")

MIB = 1024 * 1024
DENY = (
    b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n\r\n"
    b"Access denied\r\n"
)


def body(n: int, seed: int = 0) -> bytes:
    """n bytes that differ along the way, so a lost or repeated piece shows."""
    block = bytes((seed + i) % 251 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


class AllRules(PathRules):
    def check(self, method, path, host, headers):
        from types import SimpleNamespace

        ok = path.startswith(self.prefix)
        return SimpleNamespace(allowed=ok, matched=(0,) if ok else (), header_actions=())


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(1 << 20, n - len(out)))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """(head up to the blank line, bytes read past it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole head: {buf[:200]!r}"
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def read_request(sock: socket.socket, pending: bytearray) -> tuple[bytes, bytes] | None:
    """One Content-Length request from the backend's socket: (head, body); None at EOF."""
    while b"\r\n\r\n" not in pending:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return None
        pending += chunk
    end = pending.index(b"\r\n\r\n") + 4
    head = bytes(pending[:end])
    need = content_length(head)
    while len(pending) - end < need:
        chunk = sock.recv(1 << 20)
        if not chunk:
            data = bytes(pending[end:])
            pending.clear()
            return head, data  # cut by the close (the next call returns None)
        pending += chunk
    data = bytes(pending[end : end + need])
    del pending[: end + need]
    return head, data


class Backend:
    """A threaded scripted server: `serve(conn)` runs per accepted connection."""

    def __init__(self, serve) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.serve = serve
        self.requests: list[tuple[bytes, bytes]] = []
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn) -> None:
        try:
            self.serve(self, conn)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass


def echo_lengths(backend: Backend, conn: socket.socket) -> None:
    """Answers each request with `got N` after reading its whole body; GET /public/big/N gets
    an N-byte body."""
    pending = bytearray()
    while (got := read_request(conn, pending)) is not None:
        head, data = got
        backend.requests.append((head, data))
        target = head.split(b" ")[1]
        if target.startswith(b"/public/big/"):
            n = int(target.rsplit(b"/", 1)[1])
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n + body(n, 7))
        else:
            answer = b"got %d" % len(data)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(answer) + answer)


class Proxy:
    """The HTTP/1 session on a uvloop loop in a thread, listening on loopback."""

    def __init__(self, backend_port: int, config: ProxyConfig | None = None) -> None:
        self.config = config or ProxyConfig(sweep_interval=0.05)
        self.metrics = ProxyMetrics()
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pool = UpstreamPool(8, 5.0)
        self.sweeper = DeadlineSweeper(self.config.sweep_interval)
        self.sessions: list[Http1Session] = []
        self.moved = {"RequestBodyPump": 0, "ResponseBodyPump": 0}

        async def start():
            self.sweeper.start()
            return await self.loop.create_server(self._session, "127.0.0.1", 0)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]
        self.backend_port = backend_port

    def _session(self) -> Http1Session:
        ctx = ConnContext(
            config=self.config,
            client=("127.0.0.1", 1),
            listener_port=80,
            destination=OriginalDestination("127.0.0.1", self.backend_port),
            source_identity=2,
            source_labels=("reserved:world",),
            destination_identity=256,
            destination_labels=("k8s:app=web",),
            rules=lambda: AllRules(),
            flows=FlowSink(stream=io.StringIO()),
            metrics=self.metrics,
        )
        self.metrics.for_proto("http").active.inc()
        session = Http1Session(ctx, pool=self.pool, sweeper=self.sweeper)
        self.sessions.append(session)
        return session

    def close(self) -> None:
        async def stop():
            self.sweeper.stop()
            self.server.close()
            for session in self.sessions:
                session.close()
            self.pool.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def moved(monkeypatch):
    """Bytes each kind of pump moved through its pipe, across the test."""
    counts = {"RequestBodyPump": 0, "ResponseBodyPump": 0}
    for cls in (bodies.RequestBodyPump, bodies.ResponseBodyPump):
        original = cls.spliced

        def counting(self, n, _original=original, _name=cls.__name__):
            counts[_name] += n
            _original(self, n)

        monkeypatch.setattr(cls, "spliced", counting)
    return counts


@pytest.fixture
def make(request):
    made = []

    def make_pair(serve=echo_lengths, config=None):
        backend = Backend(serve)
        proxy = Proxy(backend.port, config)
        made.append((backend, proxy))
        return backend, proxy

    yield make_pair
    for backend, proxy in made:
        proxy.close()
        backend.close()


def post(path: str, n: int, extra: bytes = b"") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: web\r\nContent-Length: %d\r\n%s\r\n" % (
        path.encode(),
        n,
        extra,
    )


def get(path: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: web\r\n\r\n" % path.encode()


def read_response(sock: socket.socket, rest: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """(head, body, bytes past it) of one Content-Length response."""
    buf = rest
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole head: {buf[:200]!r}"
        buf += chunk
    head, _, buf = buf.partition(b"\r\n\r\n")
    need = content_length(head)
    while len(buf) < need:
        chunk = sock.recv(1 << 20)
        assert chunk, f"closed after {len(buf)} of {need} body bytes"
        buf += chunk
    return head, buf[:need], buf[need:]


def test_upload_arrives_exactly_and_the_pipelined_request_after_it_is_judged(make, moved):
    backend, proxy = make()
    data = body(3 * MIB, 1)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        # The head with a first piece of the body, the rest in pieces, then a denied request and
        # an allowed one pipelined right behind the last body byte.
        c.sendall(post("/public/up", len(data)) + data[:1000])
        time.sleep(0.05)
        c.sendall(data[1000 : 2 * MIB])
        c.sendall(data[2 * MIB :] + get("/secret") + post("/public/small", 5) + b"hello")
        head, answer, rest = read_response(c)
        assert head.startswith(b"HTTP/1.1 200") and answer == b"got %d" % len(data)
        rest += recv_exact(c, max(0, len(DENY) - len(rest)))
        assert rest.startswith(DENY)
        _, answer, _ = read_response(c, rest[len(DENY) :])
        assert answer == b"got 5"
    heads = [h.split(b"\r\n")[0] for h, _ in backend.requests]
    assert heads == [b"POST /public/up HTTP/1.1", b"POST /public/small HTTP/1.1"]  # no /secret
    assert backend.requests[0][1] == data and backend.requests[1][1] == b"hello"
    assert moved["RequestBodyPump"] >= 2 * MIB  # the body went through the pipe


def test_download_arrives_exactly_and_the_connection_is_reused(make, moved):
    backend, proxy = make()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        for n in (5 * MIB, 300 * 1024):
            c.sendall(get(f"/public/big/{n}"))
            head, data, rest = read_response(c)
            assert head.startswith(b"HTTP/1.1 200") and data == body(n, 7) and rest == b""
        c.sendall(get("/secret"))
        assert recv_exact(c, len(DENY)) == DENY
    assert len(backend.conns) == 1  # one upstream connection carried all of it
    assert moved["ResponseBodyPump"] >= 4 * MIB  # all but what came with the head


def test_small_bodies_and_a_zero_threshold_stay_on_the_python_path(make, moved):
    _, proxy = make(config=ProxyConfig(http1_splice_min_body=0))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(post("/public/up", MIB) + body(MIB))
        assert read_response(c)[1] == b"got %d" % MIB
        c.sendall(get(f"/public/big/{MIB}"))
        assert read_response(c)[1] == body(MIB, 7)
    assert moved == {"RequestBodyPump": 0, "ResponseBodyPump": 0}


def test_a_client_that_stops_mid_body_is_cut_at_the_idle_timeout(make, moved):
    backend, proxy = make(config=ProxyConfig(idle_timeout=0.5, sweep_interval=0.05))
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(post("/public/up", MIB) + body(200 * 1024))
        time.sleep(0.2)
        c.sendall(body(100 * 1024))  # progress pushes the deadline on
        t0 = time.monotonic()
        assert c.recv(1024) == b""  # closed, with no answer: the request never ended
        assert 0.3 < time.monotonic() - t0 < 3
    assert moved["RequestBodyPump"] > 0
    deadline = time.monotonic() + 3
    while not backend.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    # The upstream saw a cut request and the close, nothing else.
    ((head, got),) = backend.requests
    assert content_length(head) == MIB and len(got) < MIB


def test_a_client_closing_mid_body_closes_the_upstream(make, moved):
    backend, proxy = make()
    c = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    c.sendall(post("/public/up", MIB) + body(300 * 1024))
    time.sleep(0.1)
    c.close()
    deadline = time.monotonic() + 3
    while not backend.requests and time.monotonic() < deadline:
        time.sleep(0.02)
    ((head, got),) = backend.requests  # read_request returned at the upstream's EOF
    assert len(got) < MIB
    assert moved["RequestBodyPump"] > 0


def short_upstream(backend: Backend, conn: socket.socket) -> None:
    """Promises 2 MiB, sends 300 KiB of it, closes."""
    read_request(conn, bytearray())
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * MIB) + body(300 * 1024))
    time.sleep(0.1)


def test_a_short_upstream_response_cuts_the_client(make, moved):
    _, proxy = make(serve=short_upstream)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(get("/public/x"))
        head, rest = recv_head(c)
        got = rest
        while chunk := c.recv(1 << 20):
            got += chunk
    assert content_length(head) == 2 * MIB
    assert got == body(300 * 1024)  # what came, then the close: the client sees it cut
    assert moved["ResponseBodyPump"] > 0
    metrics = proxy.metrics.render()
    assert 'l7proxy_upstream_errors_total{proto="http",kind="reset"} 1\n' in metrics


def test_a_denied_upload_is_never_forwarded(make, moved):
    backend, proxy = make()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(post("/private/up", MIB) + body(MIB) + get("/public/big/10"))
        assert recv_exact(c, len(DENY)) == DENY
        _, data, _ = read_response(c)
        assert data == body(10, 7)
    assert [h.split(b" ")[1] for h, _ in backend.requests] == [b"/public/big/10"]
    assert moved["RequestBodyPump"] == 0


def test_response_length_rules():
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 70000"
    assert bodies.response_content_length(ok) == 70000
    assert bodies.response_content_length(ok + b"\r\nTransfer-Encoding: chunked") == -1
    assert bodies.response_content_length(ok + b"\r\ncontent-length: 70000") == -1
    assert bodies.response_content_length(b"HTTP/1.1 204 No Content\r\nContent-Length: 9") == -1
    assert bodies.response_content_length(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9") == -1
    assert bodies.response_content_length(b"HTTP/1.1 200 OK\r\nContent-Length: 1e5") == -1
    assert bodies.response_content_length(b"HTTP/1.1 200 OK\r\nServer: x") == -1


def test_request_keep_alive_rules():
    assert bodies.request_keeps_alive(b"1.1", ())
    assert not bodies.request_keeps_alive(b"1.1", ((b"Connection", b"Upgrade, close"),))
    assert not bodies.request_keeps_alive(b"1.0", ())
    assert bodies.request_keeps_alive(b"1.0", ((b"connection", b"Keep-Alive"),))


def closes_after_head(backend: Backend, conn: socket.socket) -> None:
    """Reads a request head and closes at once, resetting the body the proxy sends."""
    pending = bytearray()
    while b"\r\n\r\n" not in pending:
        pending += conn.recv(65536)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    conn.close()


def test_an_upstream_gone_mid_upload_gets_the_client_a_503_or_a_close(make, moved):
    _, proxy = make(serve=closes_after_head)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(post("/public/up", 4 * MIB) + body(100 * 1024))
        time.sleep(0.1)
        try:
            c.sendall(body(2 * MIB))
        except OSError:
            pass  # the proxy closed first
        out = b""
        try:
            while chunk := c.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
    # The upstream's reset reaches the proxy as a lost connection (503) or through the pump
    # (EPIPE: 503; a reset: the client is closed): never a hang, never a 200.
    assert out == b"" or out.startswith(b"HTTP/1.1 503")


@pytest.fixture
def splicers(monkeypatch):
    """How many pipes (Splicer objects) the pumps made."""
    made = [0]
    original = bodies.splice.Splicer.__init__

    def counting(self, *args, **kw):
        made[0] += 1
        original(self, *args, **kw)

    monkeypatch.setattr(bodies.splice.Splicer, "__init__", counting)
    return made


def test_uploads_one_after_another_take_their_heads_from_the_pump_and_one_pipe(
    make, moved, splicers
):
    """As wrk sends them: each upload (head and whole body in one send) after the answer to
    the one before. After the first, the pump reads each next head itself (HEAD_READ bytes), so
    all but those bytes of every later body go through the pipe, and the pipe is the first one;
    a denied and a small request between them are judged as ever, and the pump goes on after."""
    backend, proxy = make()
    size = 512 * 1024
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        for n in range(4):
            c.sendall(post("/public/up", size) + body(size, n))
            assert read_response(c)[1] == b"got %d" % size
        first = moved["RequestBodyPump"]
        c.sendall(get("/secret"))
        assert recv_exact(c, len(DENY)) == DENY
        c.sendall(post("/public/small", 5) + b"hello")
        assert read_response(c)[1] == b"got 5"
        c.sendall(post("/public/up", size) + body(size, 9))
        assert read_response(c)[1] == b"got %d" % size
    assert [d for _, d in backend.requests] == [body(size, n) for n in range(4)] + [
        b"hello",
        body(size, 9),
    ]
    # The first body's head came through the transport (up to 256 KiB of it with it); each of
    # the next three lost at most HEAD_READ bytes to Python.
    assert first >= 4 * size - 256 * 1024 - 3 * bodies.HEAD_READ
    assert moved["RequestBodyPump"] >= first + size - 256 * 1024
    assert splicers[0] <= 2  # the first pipe for four bodies; at most one more after the small one


def test_pipelined_uploads_all_arrive_exactly(make, moved):
    """Twelve uploads sent in one go: each body ends, the pump reads the next head at its
    turn, no request is lost or merged, and nothing nests per request."""
    backend, proxy = make()
    sizes = [300_000 + 997 * n for n in range(12)]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as c:
        c.sendall(b"".join(post("/public/up", n) + body(n, n) for n in sizes) + get("/secret"))
        rest = b""
        for n in sizes:
            _, answer, rest = read_response(c, rest)
            assert answer == b"got %d" % n
        rest += recv_exact(c, max(0, len(DENY) - len(rest)))
        assert rest == DENY
    assert [d for _, d in backend.requests] == [body(n, n) for n in sizes]
    # (The first body is spliced; one behind a request still waiting for its answer goes the
    # Python path, where the proxy holds it back.)
    assert moved["RequestBodyPump"] > 0


def test_a_client_closing_while_the_pump_waits_for_its_next_head_leaves_nothing_open(make, moved):
    """The pump waits for the next head when the client closes: the session ends, the pump's
    pipe and dup()s with it, and the upstream connection (at a message boundary) serves the
    next client from the pool."""
    backend, proxy = make()
    c = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    c.sendall(post("/public/up", MIB) + body(MIB))
    assert read_response(c)[1] == b"got %d" % MIB
    (session,) = proxy.sessions
    (pump,) = session.pumps
    assert pump.waiting_head
    c.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not session.closed:
        time.sleep(0.02)
    assert session.closed and pump.splicer.closed
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(post("/public/up", MIB) + body(MIB, 3))
        assert read_response(c)[1] == b"got %d" % MIB
    assert len(backend.conns) == 1 and backend.requests[1][1] == body(MIB, 3)


def test_a_next_head_longer_than_the_pumps_read_is_parsed_whole(make, moved):
    """The pump reads HEAD_READ bytes of the next request: a head longer than that is finished
    by the transport's reads, judged whole, and its body spliced as ever."""
    backend, proxy = make()
    pad = b"X-Pad: " + b"p" * (3 * bodies.HEAD_READ) + b"\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(post("/public/up", MIB) + body(MIB))
        assert read_response(c)[1] == b"got %d" % MIB
        c.sendall(post("/public/up", MIB, pad) + body(MIB, 5))
        assert read_response(c)[1] == b"got %d" % MIB
        c.sendall(b"GET /secret HTTP/1.1\r\nHost: web\r\n" + pad + b"\r\n")
        assert recv_exact(c, len(DENY)) == DENY
    assert [d for _, d in backend.requests] == [body(MIB), body(MIB, 5)]
    assert b"x-pad: " + b"p" * 100 in backend.requests[1][0].lower()
    assert moved["RequestBodyPump"] > MIB


def answers_once_then_closes(backend: Backend, conn: socket.socket) -> None:
    """Answers one request, closes its sending side and waits (3 s at most) for the proxy's close:
    `backend.saw_close` records whether it came."""
    pending = bytearray()
    got = read_request(conn, pending)
    if got is None:
        return
    backend.requests.append(got)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    conn.shutdown(socket.SHUT_WR)
    conn.settimeout(3)
    try:
        backend.saw_close.append(conn.recv(10) == b"")
    except TimeoutError:
        backend.saw_close.append(False)


def test_an_upstream_closing_while_the_pump_waits_for_a_head_is_closed_at_once(make, moved):
    """The pump waiting for the next head holds no dup() of the upstream socket: when the
    upstream closes its side after the answer, the proxy's close reaches it (a held dup() kept
    that socket open until the client's next request); the next upload takes a new connection."""
    backend, proxy = make(serve=answers_once_then_closes)
    backend.saw_close = []
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(post("/public/up", MIB) + body(MIB))
        assert read_response(c)[1] == b"ok"
        deadline = time.monotonic() + 5
        while not backend.saw_close and time.monotonic() < deadline:
            time.sleep(0.02)
        assert backend.saw_close == [True]
        c.sendall(post("/public/up", MIB) + body(MIB, 2))
        assert read_response(c)[1] == b"ok"
    assert [d for _, d in backend.requests] == [body(MIB), body(MIB, 2)]
    assert len(backend.conns) == 2 and moved["RequestBodyPump"] > MIB


def test_downloads_one_after_another_take_their_heads_from_the_pump_and_one_pipe(
    make, moved, splicers
):
    """The response side of the same: after the first 1 MiB download the pump reads each next
    response head from the upstream (HEAD_READ bytes), so all but those bytes of every later
    body go through the pipe, which is the first one."""
    backend, proxy = make()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        for _ in range(4):
            c.sendall(get(f"/public/big/{MIB}"))
            head, data, rest = read_response(c)
            assert head.startswith(b"HTTP/1.1 200") and data == body(MIB, 7) and rest == b""
        c.sendall(get("/secret"))
        assert recv_exact(c, len(DENY)) == DENY
        c.sendall(get("/public/big/10"))
        assert read_response(c)[1] == body(10, 7)
    assert moved["ResponseBodyPump"] >= 4 * MIB - 256 * 1024 - 3 * bodies.HEAD_READ
    assert splicers[0] == 1 and len(backend.conns) == 1


def test_an_upstream_parked_while_the_pump_waits_serves_the_next_client(make, moved):
    """The pump waits for the next response head when the session parks its upstream: the
    wait ends, the pooled connection is read again, and the next client's download over it
    works; so does the first client's next one."""
    backend, proxy = make(
        config=ProxyConfig(sweep_interval=0.05, upstream_park_after=0.2, idle_timeout=10)
    )
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(get(f"/public/big/{MIB}"))
        assert read_response(c)[1] == body(MIB, 7)
        time.sleep(0.6)  # parked by now
        assert proxy.sessions[0].upstream is None and not proxy.sessions[0].pumps
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as d:
            d.sendall(get(f"/public/big/{MIB}"))
            assert read_response(d)[1] == body(MIB, 7)
        c.sendall(get(f"/public/big/{2 * MIB}"))
        assert read_response(c)[1] == body(2 * MIB, 7)
    assert moved["ResponseBodyPump"] > 3 * MIB


def closes_after_a_response(backend: Backend, conn: socket.socket) -> None:
    """Answers one request with a 1 MiB body, then closes."""
    got = read_request(conn, bytearray())
    if got is not None:
        backend.requests.append(got)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % MIB + body(MIB, 7))
        time.sleep(0.2)


def test_an_upstream_closing_while_the_pump_waits_for_a_response_head(make, moved):
    backend, proxy = make(serve=closes_after_a_response)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
        c.sendall(get("/public/one"))
        assert read_response(c)[1] == body(MIB, 7)
        time.sleep(0.5)  # the upstream closed; its end reached the proxy through the pump
        c.sendall(get("/public/two"))
        assert read_response(c)[1] == body(MIB, 7)
    assert [h.split(b" ")[1] for h, _ in backend.requests] == [b"/public/one", b"/public/two"]
    assert len(backend.conns) == 2
