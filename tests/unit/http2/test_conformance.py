"""The relay against the h2spec cases it used to fail, one scripted test each (frames in, frames
and resets out), plus the stream state table and the length checks on what comes off the wire.

Each test names its h2spec case; tests/e2e/test_h2spec.py runs all 146 against the gateway."""

from __future__ import annotations

import pytest

from parsers.http2 import Decision, H2Limits, H2Relay
from parsers.http2 import frames as f
from parsers.http2.events import ConnectionFailed, RequestRejected, StreamEnded
from parsers.http2.headers import MalformedRequest, encode_fields, parse_request
from parsers.http2.streams import (
    BODY_SENT,
    CLIENT_DATA,
    CLIENT_END,
    CLIENT_HEADERS,
    CLIENT_RESET,
    CLIENT_SENDING,
    CLOSED,
    FORWARDED,
    PROXY_RESET,
    SERVER_END,
    SERVER_RESET,
    STATE_NAMES,
    TRANSITIONS,
)

from .harness import frames_of, get, started

ALLOW_ALL = lambda r: Decision(True)  # noqa: E731


def post(path: str, content_length: int | None = None) -> bytes:
    fields = [(":method", "POST"), (":scheme", "http"), (":authority", "a"), (":path", path)]
    if content_length is not None:
        fields.append(("content-length", str(content_length)))
    return encode_fields(fields)


def ok_response(sid: int, end_stream: bool = True) -> bytes:
    return f.headers_frames(sid, encode_fields([(":status", "200")]), end_stream)


def goaway_code(frames) -> int | None:
    codes = [int.from_bytes(p[4:8], "big") for t, _, _, p in frames if t == f.GOAWAY]
    return codes[-1] if codes else None


def resets(frames) -> list[tuple[int, int]]:
    return [(s, int.from_bytes(p, "big")) for t, _, s, p in frames if t == f.RST_STREAM]


def data_sent(frames, sid: int) -> list[tuple[bytes, int]]:
    return [(p, fl & f.FLAG_END_STREAM) for t, fl, s, p in frames if t == f.DATA and s == sid]


# ---- 4.2 #3: frames larger than the advertised SETTINGS_MAX_FRAME_SIZE --------------------------


def test_h2spec_4_2_3_headers_above_the_advertised_frame_size_is_a_connection_error():
    # The server advertised nothing: the client may send 16,384-byte frames, not one byte more
    # (the relay's own cap, 64 KiB here, is not what the client was told).
    relay = started(ALLOW_ALL, limits=H2Limits(max_frame_size=64 * 1024))
    block = encode_fields(
        [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/")]
        + [(f"x-dummy{i}", "x" * 4000) for i in range(5)]
    )
    assert len(block) > f.DEFAULT_MAX_FRAME_SIZE
    events = relay.receive_client(f.frame(f.HEADERS, 5, 1, block))
    assert relay.closed
    assert goaway_code(frames_of(relay.data_to_client())) == f.FRAME_SIZE_ERROR
    assert [e.error_code for e in events if isinstance(e, ConnectionFailed)] == [f.FRAME_SIZE_ERROR]
    assert b"x-dummy" not in relay.data_to_server()


def test_h2spec_4_2_3_a_larger_advertised_frame_size_applies_once_the_client_has_it():
    relay = H2Relay(ALLOW_ALL, limits=H2Limits(max_frame_size=32768))
    relay.receive_client(f.PREFACE + f.settings_frame())
    relay.receive_server(f.settings_frame([(f.SETTINGS_MAX_FRAME_SIZE, 1 << 20)]))
    told = frames_of(relay.data_to_client())[0]
    assert (f.SETTINGS_MAX_FRAME_SIZE, 32768) in f.parse_settings(told[3])  # capped
    relay.data_to_server()
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up")))
    relay.receive_client(f.data_frame(1, b"d" * 20000, True))  # legal: the client read 32768
    assert not relay.closed
    assert data_sent(frames_of(relay.data_to_server()), 1) == [(b"d" * 20000, 1)]
    relay.receive_client(f.SETTINGS_ACK)
    relay.receive_client(f.frame(f.HEADERS, 5, 3, get("/x")) + f.frame(f.PING, 0, 0, bytes(8)))
    relay.receive_client(f.data_frame(3, b"d" * 32769, True))
    assert relay.closed
    assert goaway_code(frames_of(relay.data_to_client())) == f.FRAME_SIZE_ERROR


# ---- 5.1 #8 and #11: DATA on a closed stream ------------------------------------------------


def test_h2spec_5_1_8_data_after_the_clients_own_reset_is_stream_closed():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, get("/a")))  # open, no END_STREAM
    relay.receive_client(f.rst_stream(1, f.CANCEL))
    to_server = frames_of(relay.data_to_server())
    relay.receive_client(f.data_frame(1, b"test", True))
    out = frames_of(relay.data_to_client())
    assert resets(out) == [(1, f.STREAM_CLOSED)]
    assert not relay.closed
    to_server += frames_of(relay.data_to_server())
    assert data_sent(to_server, 1) == []  # the server never sees it
    # the 4 bytes still consumed the client's connection window: given back
    assert (f.WINDOW_UPDATE, 0, 0, (4).to_bytes(4, "big")) in out


def test_h2spec_5_1_11_data_after_the_stream_closed_with_end_stream_is_stream_closed():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.headers_frames(1, get("/a"), True))
    relay.receive_server(ok_response(1))
    assert relay.active_streams == 0
    relay.data_to_client()
    relay.data_to_server()
    relay.receive_client(f.data_frame(1, b"test", True))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.STREAM_CLOSED)]
    assert relay.data_to_server() == b""


def test_data_in_flight_on_a_stream_the_server_reset_is_dropped_quietly():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up")))
    relay.receive_server(f.rst_stream(1, f.REFUSED_STREAM))
    relay.data_to_client()
    relay.data_to_server()
    relay.receive_client(f.data_frame(1, b"x" * 100, False))  # sent before the RST arrived
    out = frames_of(relay.data_to_client())
    assert resets(out) == []
    assert out == [(f.WINDOW_UPDATE, 0, 0, (100).to_bytes(4, "big"))]
    assert relay.data_to_server() == b""


def test_data_on_a_half_closed_stream_is_stream_closed_and_reset_upstream():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.headers_frames(1, get("/a"), True))  # END_STREAM: client done
    relay.data_to_server()
    relay.receive_client(f.data_frame(1, b"late", False))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.STREAM_CLOSED)]
    assert resets(frames_of(relay.data_to_server())) == [(1, f.CANCEL)]


# ---- 5.3.1 #1 and #2: a stream depending on itself -----------------------------------------


def test_h2spec_5_3_1_1_headers_depending_on_itself_is_a_stream_error():
    calls = []
    relay = started(lambda r: calls.append(r.path) or Decision(True))
    priority = (1).to_bytes(4, "big") + b"\xff"  # depends on stream 1, weight 256
    flags = f.FLAG_END_HEADERS | f.FLAG_END_STREAM | f.FLAG_PRIORITY
    events = relay.receive_client(f.frame(f.HEADERS, flags, 1, priority + get("/a")))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.PROTOCOL_ERROR)]
    assert relay.data_to_server() == b""  # never forwarded, never decided
    assert calls == []
    assert [(e.stream_id, e.error_code) for e in events if isinstance(e, RequestRejected)] == [
        (1, f.PROTOCOL_ERROR)
    ]
    # the connection carries on, with the HPACK decoder still in step
    relay.receive_client(f.headers_frames(3, get("/b"), True))
    assert [s for t, _, s, _ in frames_of(relay.data_to_server()) if t == f.HEADERS] == [3]


def test_h2spec_5_3_1_1_also_when_the_block_continues_and_is_padded():
    relay = started(ALLOW_ALL)
    block = get("/a")
    payload = b"\x02" + (3).to_bytes(4, "big") + b"\x10" + block[:3] + b"\x00\x00"
    flags = f.FLAG_PADDED | f.FLAG_PRIORITY
    relay.receive_client(
        f.frame(f.HEADERS, flags, 3, payload)
        + f.frame(f.CONTINUATION, f.FLAG_END_HEADERS, 3, block[3:])
    )
    assert resets(frames_of(relay.data_to_client())) == [(3, f.PROTOCOL_ERROR)]
    assert not relay.closed and relay.data_to_server() == b""


def test_h2spec_5_3_1_2_priority_depending_on_itself_is_a_stream_error():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.PRIORITY, 0, 1, (1).to_bytes(4, "big") + b"\xff"))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.PROTOCOL_ERROR)]
    assert not relay.closed
    # a PRIORITY depending on another stream is still dropped without a word
    relay.receive_client(f.frame(f.PRIORITY, 0, 3, (1).to_bytes(4, "big") + b"\xff"))
    assert relay.data_to_client() == b"" and relay.data_to_server() == b""


def test_priority_depending_on_itself_resets_an_open_stream_both_ways():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up")))
    relay.data_to_server()
    relay.receive_client(f.frame(f.PRIORITY, 0, 1, (1).to_bytes(4, "big") + b"\x10"))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.PROTOCOL_ERROR)]
    assert resets(frames_of(relay.data_to_server())) == [(1, f.CANCEL)]
    assert relay.active_streams == 0


# ---- 6.9.1 #3: a stream window above 2^31-1 ---------------------------------------------------


def test_h2spec_6_9_1_3_stream_window_above_the_maximum_is_flow_control_error():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, get("/a")))  # client side stays open
    relay.receive_server(ok_response(1))  # the server is done: the stream is half closed
    relay.data_to_client()
    relay.data_to_server()
    relay.receive_client(f.window_update(1, f.MAX_WINDOW))
    relay.receive_client(f.window_update(1, f.MAX_WINDOW))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.FLOW_CONTROL_ERROR)]
    assert resets(frames_of(relay.data_to_server())) == [(1, f.CANCEL)]
    assert not relay.closed


def test_stream_window_counts_the_data_the_client_was_sent():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.headers_frames(1, get("/a"), True))
    relay.receive_server(ok_response(1, end_stream=False) + f.data_frame(1, b"z" * 1000, False))
    relay.data_to_client()
    relay.data_to_server()
    # 65,535 - 1,000 + this = exactly 2^31-1: allowed
    relay.receive_client(f.window_update(1, f.MAX_WINDOW - f.DEFAULT_WINDOW + 1000))
    assert relay.data_to_client() == b""
    assert [t for t, *_ in frames_of(relay.data_to_server())] == [f.WINDOW_UPDATE]
    relay.receive_client(f.window_update(1, 1))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.FLOW_CONTROL_ERROR)]


def test_initial_window_change_pushing_a_stream_above_the_maximum_is_a_connection_error():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, get("/a")))
    relay.receive_client(f.window_update(1, f.MAX_WINDOW - f.DEFAULT_WINDOW))  # at the maximum
    relay.receive_client(f.settings_frame([(f.SETTINGS_INITIAL_WINDOW_SIZE, f.DEFAULT_WINDOW + 1)]))
    assert relay.closed
    assert goaway_code(frames_of(relay.data_to_client())) == f.FLOW_CONTROL_ERROR


# ---- 8.1.2.6 #1 and #2: content-length that does not match the DATA ---------------------------


def test_h2spec_8_1_2_6_1_body_longer_than_content_length_never_reaches_the_server():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up", 1)))
    relay.receive_client(f.data_frame(1, b"test", True))
    out = frames_of(relay.data_to_client())
    assert resets(out) == [(1, f.PROTOCOL_ERROR)]
    assert (f.WINDOW_UPDATE, 0, 0, (4).to_bytes(4, "big")) in out  # the dropped bytes, returned
    upstream = frames_of(relay.data_to_server())
    assert [t for t, *_ in upstream] == [f.HEADERS, f.RST_STREAM]
    assert not upstream[0][1] & f.FLAG_END_STREAM
    assert resets(upstream) == [(1, f.CANCEL)]


def test_h2spec_8_1_2_6_2_body_shorter_than_content_length_over_several_frames():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up", 8)))
    relay.receive_client(f.data_frame(1, b"test", False))
    relay.receive_client(f.data_frame(1, b"tes", True))  # 7 of 8, then END_STREAM
    assert resets(frames_of(relay.data_to_client())) == [(1, f.PROTOCOL_ERROR)]
    upstream = frames_of(relay.data_to_server())
    assert data_sent(upstream, 1) == [(b"test", 0)]  # the part that could still be right
    assert resets(upstream) == [(1, f.CANCEL)]  # and no END_STREAM ever


def test_content_length_matching_the_body_passes_padding_excluded():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up", 6)))
    padded = f.frame(f.DATA, f.FLAG_PADDED, 1, b"\x03abc\x00\x00\x00")  # 3 body bytes + 3 padding
    relay.receive_client(padded + f.data_frame(1, b"def", True))
    assert relay.data_to_client() == b""
    upstream = frames_of(relay.data_to_server())
    assert data_sent(upstream, 1) == [(b"\x03abc\x00\x00\x00", 0), (b"def", 1)]


def test_content_length_with_end_stream_on_the_head_or_short_trailers_is_malformed():
    relay = started(ALLOW_ALL)
    events = relay.receive_client(f.headers_frames(1, post("/up", 5), True))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.PROTOCOL_ERROR)]
    assert [e.error_code for e in events if isinstance(e, RequestRejected)] == [f.PROTOCOL_ERROR]
    assert relay.data_to_server() == b""
    relay.receive_client(f.frame(f.HEADERS, 4, 3, post("/up", 5)) + f.data_frame(3, b"abc", False))
    relay.receive_client(f.headers_frames(3, encode_fields([("x-t", "1")]), True))  # trailers
    assert resets(frames_of(relay.data_to_client())) == [(3, f.PROTOCOL_ERROR)]
    assert resets(frames_of(relay.data_to_server())) == [(3, f.CANCEL)]


def test_content_length_of_a_denied_stream_is_checked_too():
    relay = started()  # /private is denied
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/private", 1)))
    relay.data_to_client()
    relay.receive_client(f.data_frame(1, b"test", True))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.PROTOCOL_ERROR)]
    assert relay.data_to_server() == b""


def test_content_length_field_is_validated():
    base = ((":method", "POST"), (":scheme", "http"), (":path", "/"))
    assert parse_request((*base, ("content-length", "12"))).content_length == 12
    assert parse_request((*base, ("content-length", "3"), ("content-length", "3"))).content_length
    assert parse_request(base).content_length == -1
    for bad in (["1x"], ["-1"], [""], ["²"], ["9" * 19], ["3", "4"]):
        with pytest.raises(MalformedRequest):
            parse_request((*base, *(("content-length", v) for v in bad)))


# ---- the stream state table -----------------------------------------------------------------

EVENTS = (CLIENT_DATA, CLIENT_END, CLIENT_HEADERS, CLIENT_RESET) + (
    SERVER_END,
    SERVER_RESET,
    PROXY_RESET,
    BODY_SENT,
)


def test_the_state_table_is_closed_and_resets_always_close():
    states = range(len(STATE_NAMES) - 1)  # every state but CLOSED
    for (state, event), nxt in TRANSITIONS.items():
        assert state in states and event in EVENTS and nxt in range(len(STATE_NAMES))
        assert state != CLOSED
    for state in states:
        assert TRANSITIONS[(state, PROXY_RESET)] == CLOSED
        assert TRANSITIONS[(state, CLIENT_RESET)] == CLOSED
        assert (state, CLIENT_HEADERS) not in TRANSITIONS  # trailers must end the stream
        # the client may send DATA exactly in the states that say so
        assert ((state, CLIENT_DATA) in TRANSITIONS) == (state in CLIENT_SENDING)
        # only the server's own streams take server events
        assert ((state, SERVER_END) in TRANSITIONS) <= (state in FORWARDED)
        assert ((state, SERVER_RESET) in TRANSITIONS) == (state in FORWARDED)


def test_events_missing_from_the_table_are_protocol_errors():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up")))
    relay.data_to_server()
    relay.receive_client(f.frame(f.HEADERS, f.FLAG_END_HEADERS, 1, encode_fields([("x", "1")])))
    assert resets(frames_of(relay.data_to_client())) == [(1, f.PROTOCOL_ERROR)]  # no END_STREAM
    # a server ending a stream twice breaks the table from its side: a connection error
    relay.receive_client(f.headers_frames(3, get("/a"), True))
    relay.receive_server(ok_response(3, end_stream=False) + f.data_frame(3, b"", True))
    assert relay.active_streams == 0
    relay.receive_client(f.frame(f.HEADERS, 4, 5, post("/b")))
    relay.receive_server(ok_response(5) + f.data_frame(5, b"", True))
    assert relay.closed


def test_server_speaking_on_a_stream_it_never_saw_is_a_server_error():
    relay = started()
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/private")))  # denied, answered here
    events = relay.receive_server(ok_response(1))
    assert relay.closed
    assert [(e.side, e.error_code) for e in events if isinstance(e, ConnectionFailed)] == [
        ("server", f.PROTOCOL_ERROR)
    ]


def test_denied_stream_walks_the_local_states():
    relay = started(client_settings=[(f.SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/private")))
    assert STATE_NAMES[relay._streams[1].state] == "LOCAL_BODY_OPEN"  # body waits for window
    relay.receive_client(f.data_frame(1, b"abc", True))
    assert STATE_NAMES[relay._streams[1].state] == "LOCAL_BODY"
    relay.receive_client(f.window_update(1, 100))
    assert relay.active_streams == 0
    out = frames_of(relay.data_to_client())
    assert data_sent(out, 1) == [(b"Access denied\r\n", 1)]


# ---- lengths read from the wire are checked before use (issue 19.2) ---------------------------


@pytest.mark.parametrize(
    "frame_bytes, code",
    [
        (f.frame(f.HEADERS, f.FLAG_PADDED | 4, 1, b"\x09abc"), f.PROTOCOL_ERROR),  # pad > rest
        (f.frame(f.HEADERS, f.FLAG_PRIORITY | 4, 1, b"\x00\x00"), f.PROTOCOL_ERROR),  # no room
        (f.frame(f.SETTINGS, 0, 0, bytes(7)), f.FRAME_SIZE_ERROR),
        (f.frame(f.WINDOW_UPDATE, 0, 0, bytes(3)), f.FRAME_SIZE_ERROR),
        (f.frame(f.RST_STREAM, 0, 1, bytes(5)), f.FRAME_SIZE_ERROR),
        (f.frame(f.PING, 0, 0, bytes(7)), f.FRAME_SIZE_ERROR),
        (f.frame(f.GOAWAY, 0, 0, bytes(7)), f.PROTOCOL_ERROR),
        # HPACK: a string claiming 2^28 bytes in a 10-byte block, and an endless integer
        (f.headers_frames(1, b"\x00\x7f\xff\xff\xff\x7fabcd", True), f.COMPRESSION_ERROR),
        (f.headers_frames(1, b"\xff" + b"\xff" * 40 + b"\x01", True), f.COMPRESSION_ERROR),
    ],
)
def test_bad_lengths_from_the_wire_are_protocol_errors(frame_bytes, code):
    relay = started(ALLOW_ALL)
    if frame_bytes[3] == f.RST_STREAM:
        relay.receive_client(f.headers_frames(1, get("/a"), True))
        relay.data_to_client()
    relay.receive_client(frame_bytes)
    assert relay.closed
    assert goaway_code(frames_of(relay.data_to_client())) == code


def test_padded_data_with_padding_beyond_the_frame_is_a_protocol_error():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up", 4)))
    relay.receive_client(f.frame(f.DATA, f.FLAG_PADDED, 1, b"\x05ab"))
    assert relay.closed
    assert goaway_code(frames_of(relay.data_to_client())) == f.PROTOCOL_ERROR


def test_a_frame_header_announcing_more_than_the_limit_is_refused_before_buffering():
    relay = started(ALLOW_ALL)
    # only the 9-byte header has arrived: the relay does not wait for 16 MiB to come
    relay.receive_client(f.frame_header(f.MAX_FRAME_SIZE_LIMIT, f.DATA, 0, 1))
    assert relay.closed
    assert goaway_code(frames_of(relay.data_to_client())) == f.FRAME_SIZE_ERROR


def test_streams_ended_by_a_proxy_reset_report_the_reset():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(f.HEADERS, 4, 1, post("/up", 1)))
    events = relay.receive_client(f.data_frame(1, b"xx", True))
    assert [
        (e.stream_id, e.reset_code, e.reset_by) for e in events if isinstance(e, StreamEnded)
    ] == [(1, f.PROTOCOL_ERROR, "proxy")]


def test_server_frames_with_bad_lengths_are_server_errors():
    for frame_bytes in (
        f.frame(f.WINDOW_UPDATE, 0, 0, bytes(5)),
        f.frame(f.RST_STREAM, 0, 1, bytes(3)),
        f.frame(f.PING, 0, 0, bytes(9)),
        f.frame(f.SETTINGS, 0, 0, bytes(5)),
    ):
        relay = started(ALLOW_ALL)
        events = relay.receive_server(frame_bytes)
        assert relay.closed
        assert [e.side for e in events if isinstance(e, ConnectionFailed)] == ["server"]


def test_unknown_and_priority_frames_are_dropped_by_the_handler_tables():
    relay = started(ALLOW_ALL)
    relay.receive_client(f.frame(0x42, 0, 0, b"ext") + f.frame(f.PRIORITY, 0, 1, bytes(5)))
    relay.receive_server(f.frame(0x42, 0, 0, b"ext") + f.frame(f.PRIORITY, 0, 1, bytes(5)))
    assert not relay.closed
    assert relay.data_to_client() == b"" and relay.data_to_server() == b""
