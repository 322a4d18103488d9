"""The design claim in numbers: relaying a request costs far less than terminating HTTP/2 on both
sides with h2 (about 6,700 request cycles/s on this machine, ENVIRONMENT.md)."""

from __future__ import annotations

import time

import hpack

from parsers.http2 import Decision, H2Relay
from parsers.http2 import frames as f
from parsers.http2.headers import encode_fields
from policies import HttpRuleSet
from policies.model import HttpRule

H2_BOTH_ENDS_CYCLES_PER_S = 6_700


def test_relay_cycles_per_second_beat_double_termination():
    rules = HttpRuleSet([HttpRule(method="GET", path="/public/.*")])

    def decide(request):
        return Decision(rules.check(request.method, request.path, request.authority, ()).allowed)

    relay = H2Relay(decide)
    relay.receive_client(f.PREFACE + f.settings_frame())
    relay.receive_server(f.settings_frame())
    encoder = hpack.Encoder()
    request = [
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "127.0.0.1:8080"),
        (":path", "/public/index.html"),
        ("user-agent", "h2load nghttp2/1.52.0"),
    ]
    response = encode_fields([(":status", "200"), ("server", "nginx"), ("content-length", "17")])
    batches, per_batch, sid = 500, 10, 1
    inputs = []
    for _ in range(batches):
        ids = range(sid, sid + 2 * per_batch, 2)
        client = b"".join(f.headers_frames(s, encoder.encode(request), True) for s in ids)
        server = b"".join(
            f.headers_frames(s, response, False) + f.data_frame(s, b"hello from nginx\n", True)
            for s in ids
        )
        inputs.append((client, server))
        sid += 2 * per_batch
    start = time.perf_counter()
    for client, server in inputs:
        relay.receive_client(client)
        relay.data_to_server()
        relay.receive_server(server)
        relay.data_to_client()
    rate = batches * per_batch / (time.perf_counter() - start)
    print(f"relay: {rate:,.0f} request+response cycles/s")
    assert relay.active_streams == 0 and not relay.closed
    assert rate > H2_BOTH_ENDS_CYCLES_PER_S
