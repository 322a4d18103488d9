"""HTTP/2 attacks against the gateway (issue 5): each gets the RFC's or common practice's answer,
costs bounded CPU and memory, and the proxy keeps serving other clients."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from parsers.http2 import encode_fields
from parsers.http2 import frames as f
from tests.e2e.test_http2 import curl, nginx_h2, start_h2_gateway  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

GET_PUBLIC = encode_fields(
    [(":method", "GET"), (":scheme", "http"), (":authority", "gw"), (":path", "/public/index.html")]
)
GET_BIG = encode_fields(
    [(":method", "GET"), (":scheme", "http"), (":authority", "gw"), (":path", "/public/big.bin")]
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def gw(nginx_h2, tmp_path_factory):  # noqa: F811
    gateway = start_h2_gateway(tmp_path_factory.mktemp("attacks"), nginx_h2.port)
    yield gateway
    gateway.stop()


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_h2(port: int, settings=()) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(f.PREFACE + f.settings_frame(list(settings)))
    return sock


def send_quietly(sock: socket.socket, data: bytes) -> None:
    """The proxy may close mid-flood: that is the expected outcome, not an error."""
    try:
        sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass


def read_frames(sock: socket.socket, until_close: bool = True, timeout: float = 10.0) -> list:
    """(type, flags, stream, payload) of every frame received until the proxy closes."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):
            data += chunk
            if not until_close and len(data) >= 9:
                break
    except (ConnectionResetError, TimeoutError):
        pass
    out = []
    pos = 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        payload = data[pos + 9 : pos + 9 + length]
        sid = int.from_bytes(data[pos + 5 : pos + 9], "big") & 0x7FFFFFFF
        out.append((data[pos + 3], data[pos + 4], sid, payload))
        pos += 9 + length
    return out


def goaway_code(frames: list) -> int | None:
    for ftype, _, _, payload in frames:
        if ftype == f.GOAWAY:
            return int.from_bytes(payload[4:8], "big")
    return None


def assert_still_serving(port: int) -> None:
    ok = curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/public/index.html")
    assert ok.stdout == b"hello from nginx\n"


class Budget:
    """CPU seconds and RSS growth of the gateway over a block."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def __enter__(self):
        self.cpu = cpu_seconds(self.pid)
        self.rss = rss_mib(self.pid)
        return self

    def __exit__(self, *exc):
        self.cpu_used = cpu_seconds(self.pid) - self.cpu
        self.rss_grown = rss_mib(self.pid) - self.rss
        print(f"gateway: {self.cpu_used:.2f} s CPU, RSS {self.rss_grown:+.1f} MiB")


def test_rapid_reset_gets_enhance_your_calm(gw):
    sock = open_h2(gw.port)
    flood = b"".join(
        f.headers_frames(sid, GET_PUBLIC, True) + f.rst_stream(sid, f.CANCEL)
        for sid in range(1, 2 * 20_000, 2)
    )
    with Budget(gw.proc.pid) as budget:
        send_quietly(sock, flood)
        frames = read_frames(sock)
    sock.close()
    assert goaway_code(frames) == f.ENHANCE_YOUR_CALM
    assert budget.cpu_used < 3.0 and budget.rss_grown < 20
    assert_still_serving(gw.port)


def test_continuation_flood_gets_enhance_your_calm(gw):
    sock = open_h2(gw.port)
    flood = f.frame(f.HEADERS, 0, 1, GET_PUBLIC[:3]) + f.frame(f.CONTINUATION, 0, 1, b"") * 50_000
    with Budget(gw.proc.pid) as budget:
        send_quietly(sock, flood)
        frames = read_frames(sock)
    sock.close()
    assert goaway_code(frames) == f.ENHANCE_YOUR_CALM
    assert budget.cpu_used < 3.0 and budget.rss_grown < 20
    # A few large CONTINUATIONs: the header block limit, not the frame count, stops them.
    sock = open_h2(gw.port)
    send_quietly(
        sock,
        f.frame(f.HEADERS, 0, 1, GET_PUBLIC) + f.frame(f.CONTINUATION, 0, 1, b"\x00" * 16_000) * 8,
    )
    assert goaway_code(read_frames(sock)) == f.ENHANCE_YOUR_CALM
    sock.close()
    assert_still_serving(gw.port)


def _bomb_block(refs: int) -> bytes:
    """A 4 KB header inserted into the dynamic table (index 62), then referenced `refs` times."""
    value = b"a" * 4000
    insert = b"\x40\x06x-bomb" + bytes((0x7F, 0x80 + (4000 - 127) % 128, (4000 - 127) // 128))
    return GET_PUBLIC + insert + value + b"\xbe" * refs


def test_hpack_bomb_closes_the_connection_with_bounded_memory(gw):
    sock = open_h2(gw.port)
    with Budget(gw.proc.pid) as budget:
        # HEADERS + CONTINUATION within the 16 KiB frames a client may send before the
        # server's SETTINGS raise it (a larger frame would be a FRAME_SIZE_ERROR first)
        send_quietly(sock, f.headers_frames(1, _bomb_block(16_000), True))
        frames = read_frames(sock)
    sock.close()
    assert goaway_code(frames) == f.ENHANCE_YOUR_CALM
    assert budget.rss_grown < 20
    assert_still_serving(gw.port)


def test_oversized_header_list_gets_431_on_that_stream_only(gw):
    sock = open_h2(gw.port)
    send_quietly(sock, f.headers_frames(1, _bomb_block(20), True))  # ~80 KiB decoded
    send_quietly(sock, f.headers_frames(3, GET_PUBLIC, True))
    frames = []
    end = time.monotonic() + 10
    while time.monotonic() < end and not any(
        t == f.DATA and s == 3 and fl & f.FLAG_END_STREAM for t, fl, s, _ in frames
    ):
        frames += read_frames(sock, until_close=False, timeout=5)
    sock.close()
    heads = {s: p for t, _, s, p in frames if t == f.HEADERS}
    assert heads[1] == encode_fields([(":status", "431"), ("content-length", "0")])
    assert b"hello from nginx" in b"".join(p for t, _, s, p in frames if t == f.DATA and s == 3)
    assert goaway_code(frames) is None


@pytest.mark.parametrize(
    "name,frame",
    [
        ("settings", f.settings_frame()),
        ("ping", f.frame(f.PING, 0, 0, b"12345678")),
        ("empty-data", f.frame(f.DATA, 0, 1, b"")),
    ],
)
def test_control_frame_floods_get_enhance_your_calm(gw, name, frame):
    sock = open_h2(gw.port)
    opener = f.headers_frames(1, GET_PUBLIC, False) if name == "empty-data" else b""
    reader = []
    thread = threading.Thread(target=lambda: reader.extend(read_frames(sock)), daemon=True)
    thread.start()  # the flooder reads its answers (PING/SETTINGS ACKs), as a real one would
    with Budget(gw.proc.pid) as budget:
        send_quietly(sock, opener + frame * 50_000)
        thread.join(15)
    sock.close()
    assert goaway_code(reader) == f.ENHANCE_YOUR_CALM, name
    assert budget.cpu_used < 3.0 and budget.rss_grown < 20
    assert_still_serving(gw.port)


def test_zero_window_stall_holds_no_buffers(gw):
    # Stream windows 0: the server may not send a byte; nothing piles up in the proxy either.
    zero = open_h2(gw.port, [(f.SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    # Huge windows but the client never reads its socket: TCP backpressure must reach nginx.
    deaf = open_h2(gw.port, [(f.SETTINGS_INITIAL_WINDOW_SIZE, f.MAX_WINDOW)])
    deaf.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    with Budget(gw.proc.pid) as budget:
        zero.sendall(b"".join(f.headers_frames(s, GET_BIG, True) for s in range(1, 20, 2)))
        deaf.sendall(
            f.window_update(0, f.MAX_WINDOW - f.DEFAULT_WINDOW)
            + b"".join(f.headers_frames(s, GET_BIG, True) for s in range(1, 20, 2))
        )
        time.sleep(3)  # 10 x 8 MiB requested on the deaf connection
        assert_still_serving(gw.port)
    assert budget.rss_grown < 30, f"gateway grew {budget.rss_grown:.1f} MiB"
    zero.close()
    deaf.close()


def test_invalid_preface_gets_protocol_error(gw):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        frames = read_frames(sock)
    assert frames[0][0] == f.SETTINGS  # the server preface, then the error
    assert goaway_code(frames) == f.PROTOCOL_ERROR
    assert_still_serving(gw.port)


def test_stream_id_reuse_gets_protocol_error(gw):
    sock = open_h2(gw.port)
    sock.sendall(f.headers_frames(5, GET_PUBLIC, True))
    frames = read_frames(sock, until_close=False)
    while not any(t == f.DATA and s == 5 for t, _, s, _ in frames):
        frames += read_frames(sock, until_close=False)
    sock.sendall(f.headers_frames(3, GET_PUBLIC, True))  # lower than a stream already used
    frames = read_frames(sock)
    sock.close()
    assert goaway_code(frames) == f.PROTOCOL_ERROR
    sock = open_h2(gw.port)
    sock.sendall(f.headers_frames(1, GET_PUBLIC, True) + f.headers_frames(1, GET_PUBLIC, True))
    frames = read_frames(sock)
    sock.close()
    code = goaway_code(frames)
    resets = [p for t, _, s, p in frames if t == f.RST_STREAM and s == 1]
    # HEADERS again on a stream the client half-closed: STREAM_CLOSED (RFC 9113 5.1)
    assert code == f.PROTOCOL_ERROR or resets == [f.STREAM_CLOSED.to_bytes(4, "big")]
    assert_still_serving(gw.port)


def test_slow_preface_is_cut_after_the_header_timeout(nginx_h2, tmp_path):  # noqa: F811
    gateway = start_h2_gateway(tmp_path, nginx_h2.port, limits={"header_timeout": 1})
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(f.PREFACE[:10])  # and nothing more
            start = time.monotonic()
            frames = read_frames(sock)
            took = time.monotonic() - start
        assert frames == [] and 0.5 <= took <= 5.0
        assert_still_serving(gateway.port)
    finally:
        gateway.stop()
