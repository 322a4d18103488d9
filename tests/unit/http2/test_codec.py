"""HPACK helpers, gRPC framing and scripted-bytes cases of the relay that h2 won't produce."""

from __future__ import annotations

import hpack
import pytest

from parsers.http2 import Decision, H2Limits, H2Relay, upgrade_request_headers
from parsers.http2 import frames as f
from parsers.http2.events import ConnectionFailed, RequestReceived, StreamEnded
from parsers.http2.grpc import (
    GrpcFramingError,
    MessageReader,
    denied_trailers_only,
    encode_message,
    percent_decode,
    percent_encode,
)
from parsers.http2.headers import (
    CachingDecoder,
    MalformedRequest,
    block_mutates_table,
    encode_fields,
    parse_request,
)

from .harness import frames_of, get, session_ctx, started

REQUEST = [(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", "/x")]


def test_encode_fields_is_static_only_and_decodes_anywhere():
    headers = [*REQUEST, ("authorization", "secret"), ("x-custom", "v" * 300)]
    block = encode_fields(headers)
    decoder = hpack.Decoder()
    assert decoder.decode(block) == headers
    assert len(decoder.header_table.dynamic_entries) == 0  # the peer's table is untouched
    assert not block_mutates_table(block)
    assert block.startswith(bytes((0x82, 0x86)))  # :method GET, :scheme http from the static table


def test_block_mutation_detection_matches_hpack():
    encoder = hpack.Encoder()
    first = encoder.encode(REQUEST + [("user-agent", "t")])
    second = encoder.encode(REQUEST + [("user-agent", "t")])
    assert block_mutates_table(first)
    assert not block_mutates_table(second)  # all indexed now


def test_caching_decoder_memoizes_only_stable_blocks():
    encoder = hpack.Encoder()
    decoder = CachingDecoder(1 << 16)
    first = encoder.encode(REQUEST + [("x-a", "1")])
    decoder.decode(first)
    generation = decoder.generation
    again = encoder.encode(REQUEST + [("x-a", "1")])
    assert decoder.decode(again) == decoder.decode(again)
    assert decoder.generation == generation
    changed = encoder.encode(REQUEST + [("x-a", "2")])
    assert ("x-a", "2") in decoder.decode(changed)
    assert decoder.generation == generation + 1


def test_parse_request_rejects_malformed_heads():
    assert parse_request(tuple(REQUEST + [("content-type", "application/grpc")])).is_grpc
    for bad in (
        [("x", "1"), *REQUEST],  # pseudo-header after a regular one
        REQUEST + [("Upper", "1")],
        REQUEST + [("connection", "close")],
        REQUEST + [("te", "gzip")],
        REQUEST[1:],  # no :method
        [*REQUEST, (":method", "POST")],  # duplicate
    ):
        with pytest.raises(MalformedRequest):
            parse_request(tuple(bad))


def test_upgrade_request_headers():
    out = upgrade_request_headers(
        "GET",
        "/p?q=1",
        [("Host", "h"), ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
         ("HTTP2-Settings", "AAMAAABk"), ("Accept", "*/*"), ("TE", "trailers")],
    )  # fmt: skip
    assert out == (
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "h"),
        (":path", "/p?q=1"),
        ("accept", "*/*"),
        ("te", "trailers"),
    )


def test_grpc_framing_and_percent_encoding():
    reader = MessageReader(max_message=10)
    wire = encode_message(b"hello") + encode_message(b"", compressed=True)
    assert [(m.compressed, m.payload) for m in reader.receive_data(wire[:3])] == []
    got = reader.receive_data(wire[3:])
    assert [(m.compressed, m.payload) for m in got] == [(False, b"hello"), (True, b"")]
    with pytest.raises(GrpcFramingError):
        reader.receive_data(encode_message(b"x" * 11))
    assert percent_encode("Access denied") == "Access denied"
    assert percent_encode("100% ✓\n") == "100%25 %E2%9C%93%0A"
    assert percent_decode(percent_encode("100% ✓\n")) == "100% ✓\n"
    assert dict(denied_trailers_only())["grpc-status"] == "7"


# ---- scripted relay: bytes in, bytes out ----------------------------------------------------


def test_server_settings_come_first_and_are_capped():
    relay = H2Relay(lambda r: Decision(False), limits=H2Limits(max_concurrent_streams=5))
    relay.receive_client(f.PREFACE + f.settings_frame() + f.headers_frames(1, get("/x"), True))
    assert relay.data_to_client() == b""  # nothing before the server's SETTINGS
    upstream = frames_of(relay.data_to_server()[len(f.PREFACE) :])
    sent = f.parse_settings(upstream[0][3])
    assert (f.SETTINGS_ENABLE_PUSH, 0) in sent and (f.SETTINGS_HEADER_TABLE_SIZE, 0) in sent
    relay.receive_server(f.settings_frame([(f.SETTINGS_MAX_CONCURRENT_STREAMS, 1000)]))
    out = frames_of(relay.data_to_client())
    assert out[0][0] == f.SETTINGS
    assert f.parse_settings(out[0][3]) == [(f.SETTINGS_MAX_CONCURRENT_STREAMS, 5)]
    assert [t for t, *_ in out[1:]] == [f.HEADERS, f.DATA]  # then the 403


def test_403_body_waits_for_a_zero_stream_window():
    relay = started(client_settings=[(f.SETTINGS_INITIAL_WINDOW_SIZE, 0)])
    relay.receive_client(f.headers_frames(1, get("/private"), True))
    out = frames_of(relay.data_to_client())
    assert [(t, fl & 1) for t, fl, *_ in out] == [(f.HEADERS, 0)]
    relay.receive_client(f.window_update(1, 100))
    out = frames_of(relay.data_to_client())
    assert out == [(f.DATA, 1, 1, b"Access denied\r\n")]


def test_local_body_is_withheld_from_the_next_connection_window_update():
    relay = started()
    relay.receive_client(f.headers_frames(1, get("/private"), True))
    relay.data_to_client()
    relay.receive_client(f.window_update(0, 100))
    # 15 bytes of the client's window went to the proxy's own 403 body, not to the server
    assert frames_of(relay.data_to_server()) == [(f.WINDOW_UPDATE, 0, 0, (85).to_bytes(4, "big"))]


def test_server_data_is_held_while_the_client_window_is_borrowed():
    relay = started()
    relay.receive_client(f.headers_frames(1, get("/public"), True))
    relay.receive_server(f.headers_frames(1, encode_fields([(":status", "200")]), False))
    relay.receive_server(
        f.data_frame(1, b"x" * 16384, False) * 3 + f.data_frame(1, b"y" * 16363, False)
    )
    relay.receive_client(f.headers_frames(3, get("/private"), True))  # 15 of the last 20 bytes
    relay.data_to_client()
    relay.data_to_server()
    relay.receive_server(f.data_frame(1, b"z" * 20, True))  # the server believes 20 are free
    assert relay.data_to_client() == b""  # only 5 are: held in the proxy
    relay.receive_client(f.window_update(0, 15))
    assert relay.data_to_server() == b""  # the 15 repay the proxy's own body
    assert frames_of(relay.data_to_client()) == [(f.DATA, 1, 1, b"z" * 20)]


def test_drain_sends_goaway_and_closes_when_streams_finish():
    relay = started()
    relay.receive_client(f.headers_frames(1, get("/public"), True))
    relay.data_to_server()
    relay.drain()
    assert frames_of(relay.data_to_client())[0][0] == f.GOAWAY
    relay.receive_client(f.headers_frames(3, get("/public"), True))
    assert frames_of(relay.data_to_client()) == [
        (f.RST_STREAM, 0, 3, f.REFUSED_STREAM.to_bytes(4, "big"))
    ]
    assert not relay.closed
    events = relay.receive_server(f.headers_frames(1, encode_fields([(":status", "204")]), True))
    assert any(isinstance(e, StreamEnded) and e.status == 204 for e in events)
    assert relay.closed
    # the last response is still delivered before the connection closes
    assert [(t, s) for t, _, s, _ in frames_of(relay.data_to_client())] == [(f.HEADERS, 1)]


def test_upstream_failure_and_server_protocol_errors():
    relay = H2Relay(lambda r: Decision(True))
    relay.receive_client(f.PREFACE + f.settings_frame())
    events = relay.upstream_failed("refused")
    out = frames_of(relay.data_to_client())
    assert [t for t, *_ in out] == [f.SETTINGS, f.GOAWAY]
    assert out[1][3][:4] == bytes(4)  # last stream 0: retry is safe
    assert isinstance(events[0], ConnectionFailed) and relay.closed

    relay = started()
    relay.receive_client(f.headers_frames(1, get("/public"), True))
    relay.receive_server(f.frame(f.PUSH_PROMISE, 4, 1, bytes(4) + get("/pushed")))
    assert relay.closed
    assert frames_of(relay.data_to_client())[-1][0] == f.GOAWAY


def test_upgraded_request_is_stream_one():
    relay = H2Relay(lambda r: Decision(True))
    events = relay.start_upgraded(tuple(REQUEST), b"", f.settings_frame()[9:])
    assert isinstance(events[0], RequestReceived) and events[0].stream_id == 1
    upstream = relay.data_to_server()
    assert upstream.startswith(f.PREFACE)
    assert [(t, s) for t, _, s, _ in frames_of(upstream[len(f.PREFACE) :])] == [
        (f.SETTINGS, 0),
        (f.HEADERS, 1),
    ]
    relay.receive_client(f.PREFACE + f.settings_frame())
    assert relay.data_to_server() == f.settings_frame([(f.SETTINGS_ENABLE_PUSH, 0), (1, 0)])
    relay.receive_server(f.settings_frame() + f.SETTINGS_ACK)  # ACK of HTTP2-Settings: swallowed
    assert [t for t, *_ in frames_of(relay.data_to_client())] == [f.SETTINGS]


def test_frame_too_large_and_bad_first_frame():
    relay = H2Relay(lambda r: Decision(True))
    relay.receive_client(f.PREFACE + f.frame(f.PING, 0, 0, bytes(8)))
    assert relay.closed
    relay = started()
    relay.receive_client(f.frame_header(1 << 20, f.DATA, 0, 1))
    assert relay.closed
    goaway = frames_of(relay.data_to_client())[-1]
    assert int.from_bytes(goaway[3][4:8], "big") == f.FRAME_SIZE_ERROR


def test_server_goaway_then_close_refuses_only_unprocessed_streams():
    relay = started()
    relay.receive_client(f.headers_frames(1, get("/public"), True))
    relay.receive_client(f.headers_frames(3, get("/public"), True))
    relay.data_to_server()
    relay.receive_server(f.goaway(1, f.NO_ERROR))
    relay.receive_server(f.headers_frames(1, encode_fields([(":status", "200")]), True))
    assert [t for t, *_ in frames_of(relay.data_to_client())] == [f.GOAWAY, f.HEADERS]
    events = relay.server_closed()
    assert [(e.stream_id, e.reset_code) for e in events] == [(3, f.REFUSED_STREAM)]
    assert relay.closed
    assert relay.data_to_client() == b""  # no second GOAWAY with a higher last stream ID


def test_a_failing_policy_closes_only_that_connection(capsys):

    from l7proxy.http2.session import H2Session

    class Transport:
        aborted = False

        def set_write_buffer_limits(self, *a):
            pass

        def write(self, data):
            pass

        def abort(self):
            self.aborted = True

    def broken_rules():
        raise RuntimeError("policy bug")

    ctx = session_ctx(broken_rules)
    session = H2Session(ctx)
    transport = Transport()
    session.connection_made(transport)
    session.data_received(f.PREFACE + f.settings_frame() + f.headers_frames(1, get("/x"), True))
    assert transport.aborted and session.closed
    assert ctx.proto_metrics.parse_errors.value == 1
    assert "policy bug" in capsys.readouterr().err


def test_upgraded_request_body_goes_upstream_as_data():
    relay = H2Relay(lambda r: Decision(True))
    post = (
        (":method", "POST"),
        (":scheme", "http"),
        (":authority", "a"),
        (":path", "/up"),
        ("content-length", "20000"),
    )
    relay.start_upgraded(post, b"b" * 20000, b"")
    upstream = frames_of(relay.data_to_server()[len(f.PREFACE) :])
    assert [(t, fl & 1) for t, fl, _, _ in upstream] == [
        (f.SETTINGS, 0),
        (f.HEADERS, 0),
        (f.DATA, 0),
        (f.DATA, 1),
    ]
    assert b"".join(p for t, _, _, p in upstream if t == f.DATA) == b"b" * 20000


def test_http1_upstream_is_reported_as_such():
    relay = H2Relay(lambda r: Decision(True))
    relay.receive_client(f.PREFACE + f.settings_frame())
    events = relay.receive_server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    assert relay.closed and "HTTP/1" in events[0].reason


def test_server_concurrency_limit_is_enforced_once_the_client_acknowledged_it():
    relay = H2Relay(lambda r: Decision(True))
    relay.receive_client(f.PREFACE + f.settings_frame())
    relay.receive_server(f.settings_frame([(f.SETTINGS_MAX_CONCURRENT_STREAMS, 1)]))
    relay.data_to_server()
    relay.receive_client(
        f.headers_frames(1, get("/a"), True) + f.headers_frames(3, get("/b"), True)
    )
    relay.data_to_client()
    assert [s for t, _, s, _ in frames_of(relay.data_to_server()) if t == f.HEADERS] == [1, 3]
    relay.receive_client(f.SETTINGS_ACK)  # from now on 1 stream at a time
    relay.receive_server(f.headers_frames(1, encode_fields([(":status", "200")]), True))
    relay.receive_client(f.headers_frames(5, get("/c"), True))
    out = frames_of(relay.data_to_client())
    assert (f.RST_STREAM, 0, 5, f.REFUSED_STREAM.to_bytes(4, "big")) in out  # 3 is still open
