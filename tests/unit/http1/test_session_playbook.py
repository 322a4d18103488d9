from l7proxy.config import ProxyConfig
from l7proxy.http1 import lifetime
from parsers.http1 import RequestParser
from tests.unit.http1.playbook import PathRules, Play

DENY = (
    b"HTTP/1.1 403 Forbidden\r\ncontent-length: 15\r\ncontent-type: text/plain\r\n\r\n"
    b"Access denied\r\n"
)
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def req(path: str, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: web\r\n%s\r\n" % (path.encode(), extra)


def test_allowed_request_goes_up_and_response_comes_back_unchanged():
    p = Play()
    p.client_sends(req("/public/a"))
    assert p.upstream_got() == req("/public/a")
    p.upstream_sends(OK)
    assert p.client_got() == OK
    (flow,) = p.flows()
    assert flow["verdict"] == "FORWARDED" and flow["l7"]["http"]["code"] == 200
    assert flow["l4"]["TCP"] == {"source_port": 5555, "destination_port": 80}
    assert 'policy_l7_total{rule="forwarded",proto="http"} 1' in p.metrics.render()


def test_pipelined_deny_is_answered_in_place():
    p = Play()
    p.client_sends(req("/public/1") + req("/secret") + req("/public/3"))
    assert p.upstream_got() == req("/public/1")  # one at a time
    assert p.client_got() == b""  # the 403 waits for the first response
    p.upstream_sends(OK)
    assert p.client_got() == OK + DENY
    assert p.upstream_got() == req("/public/3")
    p.upstream_sends(OK)
    assert p.client_got() == OK
    assert [f["verdict"] for f in p.flows()] == ["FORWARDED", "DROPPED", "FORWARDED"]


def test_denied_body_is_skipped_and_connection_stays_usable():
    p = Play()
    p.client_sends(b"POST /public/a HTTP/1.1\r\nHost: w\r\nContent-Length: 4\r\n\r\nbo")
    assert p.client_got() == DENY
    p.client_sends(b"dy" + req("/public/b"))
    assert p.upstream_got() == req("/public/b")
    assert not p.client.closed


def test_chunked_body_is_reframed_without_extensions_and_with_trailers():
    p = Play(PathRules(method="POST"))
    p.client_sends(b"POST /public/u HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n")
    p.client_sends(b"3;evil=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    assert p.upstream_got() == (
        b"POST /public/u HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    )


def test_backpressure_both_ways():
    p = Play(PathRules(method="POST"))
    p.client_sends(b"POST /public/u HTTP/1.1\r\nHost: w\r\nContent-Length: 10\r\n\r\n12345")
    p.up.pause_writing()  # upstream buffer full: stop reading the client
    assert not p.client.reading
    p.up.resume_writing()
    assert p.client.reading
    p.session.pause_writing()  # client buffer full: stop reading the upstream
    assert not p.up.transport.reading
    p.session.resume_writing()
    assert p.up.transport.reading


def test_upstream_reset_mid_response_closes_client_with_flow():
    p = Play()
    p.client_sends(req("/public/a"))
    p.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
    p.up.connection_lost(ConnectionResetError())
    assert p.client.closed and p.client_got().endswith(b"part")
    assert p.flows()[-1]["drop_reason_desc"] == "UPSTREAM_RESET"


def test_head_response_ends_at_its_head_and_next_request_follows():
    p = Play(PathRules(method="HEAD"))
    p.client_sends(b"HEAD /public/a HTTP/1.1\r\nHost: w\r\n\r\n")
    p.upstream_got()
    p.upstream_sends(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
    p.client_sends(b"HEAD /public/b HTTP/1.1\r\nHost: w\r\n\r\n")
    assert p.upstream_got() == b"HEAD /public/b HTTP/1.1\r\nHost: w\r\n\r\n"


def test_upgrade_tunnels_after_101_only():
    p = Play()
    up_req = req("/public/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n")
    p.client_sends(up_req + b"early")
    assert p.upstream_got() == up_req  # tunnel bytes held until the 101
    assert not p.client.reading  # and no more are read meanwhile
    p.upstream_sends(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert p.upstream_got() == b"early" and p.client.reading
    p.client_sends(b"\x81\x00 not http")
    assert p.upstream_got() == b"\x81\x00 not http"
    p.upstream_sends(b"\x00\x01 server frames")
    assert p.client_got().endswith(b"\x00\x01 server frames")


def test_header_actions_rewrite_the_forwarded_head():
    rules = PathRules(actions=(("ADD", "X-Add", "1"), ("DELETE", "X-Del", ""), ("LOG", "X-L", "s")))
    p = Play(rules)
    p.client_sends(req("/public/a", b"X-Del: x\r\nX-L: secret\r\n"))
    assert p.upstream_got() == (
        b"GET /public/a HTTP/1.1\r\nHost: web\r\nX-L: secret\r\nX-Add: 1\r\n\r\n"
    )


def test_header_timeout_answers_408_and_idle_closes():
    p = Play(config=ProxyConfig(header_timeout=5))
    p.client_sends(b"GET /public/a HTTP/1.1\r\nHo")
    assert p.session.deadline_kind == lifetime.HEAD
    p.session.on_deadline()
    assert p.client_got().startswith(b"HTTP/1.1 408 Request Timeout") and p.client.closed
    q = Play()
    assert q.session.deadline_kind == lifetime.IDLE
    q.session.on_deadline()
    assert q.client.closed and q.client_got() == b""


def test_response_timeout_answers_504():
    p = Play()
    p.client_sends(req("/public/a"))
    assert p.session.deadline_kind == lifetime.RESPONSE
    p.session.on_deadline()
    assert p.client_got().startswith(b"HTTP/1.1 504 Gateway Timeout")
    assert p.flows()[-1]["drop_reason_desc"] == "UPSTREAM_TIMEOUT"


def test_parse_error_after_pipelined_request_waits_its_turn():
    p = Play()
    p.client_sends(req("/public/a") + b"BAD REQUEST LINE\r\n\r\n")
    assert p.client_got() == b""
    p.upstream_sends(OK)
    out = p.client_got()
    assert out.startswith(OK + b"HTTP/1.1 400 Bad Request") and p.client.closed


def test_connection_close_request_ends_connection_and_keeps_upstream_pooled():
    p = Play()
    p.client_sends(req("/public/a", b"Connection: close\r\n"))
    p.upstream_sends(OK)
    assert p.client.closed and p.pool.released == [p.up]


def test_drain_closes_after_the_request_in_flight():
    p = Play()
    p.client_sends(req("/public/a"))
    p.session.drain()
    assert not p.client.closed
    p.upstream_sends(OK)
    assert p.client_got() == OK and p.client.closed


def test_close_delimited_response_completes_at_upstream_close():
    p = Play()
    p.client_sends(req("/public/a"))
    p.upstream_sends(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
    p.up.connection_lost(None)
    assert p.client_got().endswith(b"until the end") and p.client.closed
    flow = p.flows()[-1]
    assert flow["verdict"] == "FORWARDED" and flow["l7"]["http"]["code"] == 200
    assert "UPSTREAM_RESET" not in p.flows_text()


def test_a_failing_session_closes_its_connection_only():
    """uvloop closes the transport whose protocol raised; the server keeps serving."""
    import asyncio

    import uvloop

    async def run():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: None)
        plays = []

        def factory():
            play = Play()
            play.session.parser = None  # any bug inside the session
            plays.append(play)
            return play.session

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(req("/public/a"))
        assert await reader.read() == b""  # that connection is closed
        assert server.is_serving()
        assert plays[0].session.closed
        server.close()

    uvloop.run(run())


def test_response_clock_starts_when_the_request_body_ends():
    p = Play(PathRules(method="POST"))
    p.client_sends(b"POST /public/u HTTP/1.1\r\nHost: w\r\nContent-Length: 4\r\n\r\nab")
    assert p.session.deadline_kind == lifetime.IDLE  # uploading: no 504 yet
    p.client_sends(b"cd")
    assert p.session.deadline_kind == lifetime.RESPONSE
    p.session.on_deadline()
    assert p.client_got().startswith(b"HTTP/1.1 504")


def test_partial_pipelined_head_does_not_replace_the_response_deadline():
    p = Play()
    p.client_sends(req("/public/a") + b"GET /public/b HT")
    assert p.session.deadline_kind == lifetime.RESPONSE


def test_first_bytes_of_the_next_request_are_not_forwarded_with_this_one():
    p = Play()
    p.client_sends(b"GET /public/a HTTP/1.1\r\nHost:web\r\n\r\nGE")
    assert p.upstream_got() == b"GET /public/a HTTP/1.1\r\nHost: web\r\n\r\n"  # rebuilt
    p.upstream_sends(OK)
    p.client_sends(b"T /public/b HTTP/1.1\r\nHost: web\r\n\r\n")
    assert p.upstream_got() == req("/public/b")


def test_hot_path_script_runs_and_reports_both_paths(capsys):
    from tests.unit.http1 import hotpath

    forwarded, denied = hotpath.measure(200)
    assert 0 < denied and 0 < forwarded


def test_body_of_a_waiting_pipelined_request_is_bounded():
    p = Play(
        PathRules(method="POST"), config=ProxyConfig(write_high_water=1000, write_low_water=100)
    )
    p.client_sends(b"POST /public/1 HTTP/1.1\r\nHost: w\r\nContent-Length: 1\r\n\r\nx")
    p.client_sends(b"POST /public/2 HTTP/1.1\r\nHost: w\r\nContent-Length: 5000\r\n\r\n")
    p.client_sends(b"y" * 600)
    assert p.client.reading
    p.client_sends(b"y" * 600)
    assert not p.client.reading  # 1,200 bytes held behind request 1: stop reading
    p.upstream_sends(OK)  # request 1 answered: request 2 goes with what was held
    assert p.upstream_got().endswith(b"y" * 1200) and p.client.reading


def test_response_head_above_the_limit_is_a_502_and_nothing_of_it_reaches_the_client():
    p = Play(config=ProxyConfig(max_response_header_bytes=1024))
    p.client_sends(req("/public/a"))
    up = p.up
    head = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 600
    p.upstream_sends(head)  # incomplete and under the limit: held
    assert p.client_got() == b""
    p.upstream_sends(b"b" * 600)  # still no end of head, now above 1024 bytes
    out = p.client_got()
    assert out.startswith(b"HTTP/1.1 502 Bad Gateway") and b"X-Big" not in out
    assert up.closed and up not in p.pool.released
    flow = p.flows()[-1]
    assert flow["verdict"] == "ERROR" and flow["l7"]["http"]["code"] == 502
    assert flow["drop_reason_desc"] == "UPSTREAM_RESPONSE_HEADER_TOO_LARGE"
    text = p.metrics.render()
    assert 'l7proxy_upstream_errors_total{proto="http",kind="invalid_response"} 1' in text
    # The client connection is still usable: the next request gets a fresh upstream.
    p.client_sends(req("/public/b"))
    assert p.up is not up and p.upstream_got() == req("/public/b")
    p.upstream_sends(OK)
    assert p.client_got() == OK


def test_response_head_split_over_reads_and_after_100_continue_is_forwarded_whole():
    p = Play(PathRules(method="POST"), config=ProxyConfig(max_response_header_bytes=1024))
    p.client_sends(
        b"POST /public/a HTTP/1.1\r\nHost: w\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    p.upstream_sends(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nConte")
    assert p.client_got() == b"HTTP/1.1 100 Continue\r\n\r\n"  # interim head at once
    p.client_sends(b"hi")
    p.upstream_sends(b"nt-Length: 2\r")
    assert p.client_got() == b""
    p.upstream_sends(b"\n\r\nok")
    assert p.client_got() == OK
    # The limit applies per head: a full-size head is fine, one byte more is not.
    p.rules.method = "GET"
    p.client_sends(req("/public/b"))
    pad = 1024 - len(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: \r\n\r\n")
    exact = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX: " + b"p" * pad + b"\r\n\r\nok"
    p.upstream_sends(exact)
    assert p.client_got() == exact
    p.client_sends(req("/public/c"))
    p.upstream_sends(exact.replace(b"X: p", b"X: pp"))
    assert p.client_got().startswith(b"HTTP/1.1 502 Bad Gateway")


class _RefusingParser(RequestParser):
    __slots__ = ()

    def receive_data(self, data):
        raise AssertionError(f"parser ran on {data!r}")


def _parser_must_not_run(p: Play) -> None:
    p.session.parser = _RefusingParser()  # at rest, as the real one is between requests


def test_a_repeated_head_skips_the_parser_with_the_same_outcome():
    p = Play()
    for _ in range(2):
        p.client_sends(req("/public/a"))
        assert p.upstream_got() == req("/public/a")
        p.upstream_sends(OK)
        assert p.client_got() == OK
        p.client_sends(req("/secret"))
        assert p.client_got() == DENY
        _parser_must_not_run(p)  # the second round is served from what the first one parsed
    assert [f["verdict"] for f in p.flows()] == ["FORWARDED", "DROPPED"] * 2
    text = p.metrics.render()
    assert 'policy_l7_total{rule="forwarded",proto="http"} 2' in text
    assert 'policy_l7_total{rule="denied",proto="http"} 2' in text


def test_a_remembered_head_gets_the_verdict_of_the_policy_now_in_force():
    p = Play()
    p.client_sends(req("/public/a"))
    p.upstream_sends(OK)
    assert p.client_got() == OK
    p.rules = PathRules(prefix="/other/")  # a reload: a new rule set object
    p.client_sends(req("/public/a"))
    assert p.client_got() == DENY and p.upstream_got() == req("/public/a")  # (the first one)


def test_a_remembered_head_inside_a_partial_head_is_header_bytes():
    p = Play()
    p.client_sends(req("/public/a"))
    p.upstream_sends(OK)
    p.upstream_got(), p.client_got()
    p.client_sends(b"GET /secret HTTP/1.1\r\nX-A: ")
    p.client_sends(req("/public/a"))  # the bytes of a known request, mid-head: a header value
    assert p.upstream_got() == b"" and p.client_got() == DENY


def test_a_remembered_head_behind_a_request_in_flight_waits_its_turn():
    p = Play()
    p.client_sends(req("/public/a"))
    p.upstream_sends(OK)
    p.upstream_got(), p.client_got()
    p.client_sends(req("/public/b"))
    p.client_sends(req("/public/a"))  # pipelined behind /public/b
    assert p.upstream_got() == req("/public/b")
    p.upstream_sends(OK)
    assert p.upstream_got() == req("/public/a")
    p.upstream_sends(OK)
    assert p.client_got() == OK + OK


def test_a_remembered_head_after_a_read_that_ended_inside_a_method_is_parsed():
    p = Play()
    p.client_sends(req("/public/a"))
    p.upstream_sends(OK)
    p.upstream_got(), p.client_got()
    p.client_sends(req("/public/b") + b"GE")  # the next message has begun: the parser holds "GE"
    p.upstream_sends(OK)
    assert p.upstream_got() == req("/public/b") and p.client_got() == OK
    p.client_sends(req("/public/a"))  # so these bytes continue "GE": "GEGET ..." is no method
    assert p.upstream_got() == b""
    assert p.client_got().startswith(b"HTTP/1.1 400 ") and p.client.closed


def test_an_idle_client_gives_its_upstream_back_to_the_pool_then_idles_out():
    p = Play(config=ProxyConfig(upstream_park_after=1, idle_timeout=60))
    p.client_sends(req("/public/a"))
    first = p.up
    p.upstream_sends(OK)
    assert p.client_got() == OK
    s = p.session
    assert s.deadline_kind == lifetime.PARK and s.upstream is first
    idle_since = s.deadline - 1
    s.on_deadline()
    assert p.pool.released == [first] and s.upstream is None and not p.client.closed
    assert s.deadline_kind == lifetime.IDLE and s.deadline == idle_since + 60
    p.client_sends(req("/public/b"))  # the next request takes a connection from the pool
    assert len(p.pool.conns) == 2 and p.upstream_got() == req("/public/b")
    p.upstream_sends(OK)
    assert p.client_got() == OK
    s.on_deadline()  # parks the second one
    s.on_deadline()  # then the idle timeout closes the client
    assert p.pool.released == p.pool.conns and p.client.closed


def test_a_request_in_flight_keeps_its_upstream():
    p = Play(config=ProxyConfig(upstream_park_after=1, idle_timeout=60))
    p.client_sends(req("/public/a"))
    p.upstream_sends(OK)
    p.client_sends(req("/public/b"))  # in flight: the deadline is the response's now
    assert p.session.deadline_kind == lifetime.RESPONSE
    assert p.pool.released == [] and p.session.upstream is p.up


def test_parking_is_off_when_the_idle_timeout_comes_first():
    p = Play(config=ProxyConfig(upstream_park_after=5, idle_timeout=2))
    p.client_sends(req("/public/a"))
    p.upstream_sends(OK)
    assert p.session.deadline_kind == lifetime.IDLE
