import asyncio
import io
import json

from l7proxy.admin import AdminRequest, AdminServer
from l7proxy.cli import main
from l7proxy.commands.map import read_flow_log
from l7proxy.depmap import hold, mount
from l7proxy.depmap.hold import wait_plan
from l7proxy.depmap.web import parse_since
from l7proxy.flows import FlowSink

from .flows import DEATHSTAR, TIEFIGHTER, XWING, http_flow, l4_flow


def get(path, **headers):
    path, _, query = path.partition("?")
    q = {}
    for part in filter(None, query.split("&")):
        k, _, v = part.partition("=")
        q.setdefault(k, []).append(v)
    return AdminRequest("GET", path, q, {k.replace("_", "-"): v for k, v in headers.items()})


def sse_events(chunks: list[bytes]) -> list[dict]:
    out = []
    for chunk in chunks:
        lines = chunk.decode().strip().split("\n")
        fields = dict(line.split(": ", 1) for line in lines if not line.startswith((":", "retry")))
        if fields.get("event") == "changes":
            out.append({"id": fields["id"], **json.loads(fields["data"])})
    return out


def test_parse_since_accepts_only_this_epoch():
    assert parse_since("ab12-7", "ab12") == 7
    assert parse_since("ffff-7", "ab12") == 0
    assert parse_since("", "ab12") == 0
    assert parse_since("ab12-x", "ab12") == 0


def test_mount_serves_page_json_dot_assets_and_feeds_from_the_sink():
    async def scenario():
        admin = AdminServer()
        sink = FlowSink(None)
        service = mount(admin, sink)
        assert {"/map", "/map.json", "/map.dot", "/map/events", "/map/static/map.js"} <= set(
            admin.routes()
        )
        sink.emit(http_flow(TIEFIGHTER, DEATHSTAR))
        sink.emit(http_flow(TIEFIGHTER, DEATHSTAR, verdict="DROPPED", code=403, sport=2))
        await asyncio.sleep(0.01)
        page = await admin.dispatch(get("/map"))
        assert page.status == 200 and page.content_type.startswith("text/html")
        assert b'id="edge-list"' in page.body and b"/map/static/map.js" in page.body
        assert "default-src 'self'" in page.headers["content-security-policy"]
        js = await admin.dispatch(get("/map/static/map.js"))
        assert js.status == 200 and b"EventSource" in js.body
        graph = json.loads((await admin.dispatch(get("/map.json"))).body)
        assert graph["epoch"] == service.epoch
        assert [(e["forwarded"], e["dropped"]) for e in graph["edges"]] == [(1, 1)]
        dot = (await admin.dispatch(get("/map.dot"))).body.decode()
        assert '"tiefighter" -> "deathstar"' in dot and "color=red" in dot
        await service.close()
        assert not sink.active  # unsubscribed

    asyncio.run(scenario())


def test_the_agents_flow_log_feeds_the_map_in_line_and_wakes_streams_once_per_turn():
    """On the agent's FlowLog the map is an observer: a flow is counted before ingest returns
    (no queue, no consumer task), open streams are woken once per loop turn (with none open,
    nothing is scheduled), close detaches it."""
    from l7proxy.agent.flowlog import FlowLog

    async def scenario():
        log = FlowLog()
        service = mount(AdminServer(), log)
        idle = service._changed
        log.ingest(http_flow(TIEFIGHTER, DEATHSTAR, sport=9))
        assert service.map.flows_seen == 1 and not service._wake_pending  # no stream: no wake
        await asyncio.sleep(0)
        assert service._changed is idle and not idle.is_set()
        stream = service.stream(service.map.version)
        assert await stream.__anext__() == b"retry: 2000\n\n" and service.streams == 1
        woken = service._changed
        for sport in range(3):
            log.ingest(http_flow(TIEFIGHTER, DEATHSTAR, sport=sport))
        assert service.map.flows_seen == 4  # counted in line
        assert not woken.is_set() and service._changed is woken  # the wake waits for the turn
        await asyncio.sleep(0)
        assert woken.is_set() and service._changed is not woken  # one wake for the three
        await stream.aclose()
        assert service.streams == 0
        await service.close()
        log.ingest(http_flow(TIEFIGHTER, DEATHSTAR))
        assert service.map.flows_seen == 4  # detached

    asyncio.run(scenario())


def test_event_stream_sends_snapshot_then_only_changes_and_resumes_by_last_event_id():
    async def scenario():
        admin = AdminServer()
        service = mount(admin, interval=0.0, heartbeat=0.05)
        service.feed(http_flow(TIEFIGHTER, DEATHSTAR))
        resp = await admin.dispatch(get("/map/events"))
        assert resp.content_type == "text/event-stream"
        stream = resp.stream
        assert await anext(stream) == b"retry: 2000\n\n"
        first = sse_events([await anext(stream)])[0]
        assert [e["source"] for e in first["edges"]] == ["tiefighter"]
        assert first["id"] == f"{service.epoch}-{first['version']}"
        # Nothing new: a heartbeat comment, then the change once a flow arrives.
        assert await anext(stream) == b": keep-alive\n\n"
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        service.feed(l4_flow(XWING, DEATHSTAR))
        second = sse_events([await waiting])[0]
        assert [e["source"] for e in second["edges"]] == ["xwing"]
        assert [n["id"] for n in second["nodes"]] == ["xwing"]
        await stream.aclose()
        assert service.streams == 0
        # A reconnecting EventSource sends Last-Event-ID and gets only what it missed.
        service.feed(http_flow(TIEFIGHTER, DEATHSTAR, sport=3))
        resumed = (await admin.dispatch(get("/map/events", last_event_id=second["id"]))).stream
        await anext(resumed)
        delta = sse_events([await anext(resumed)])[0]
        assert [(e["source"], e["forwarded"]) for e in delta["edges"]] == [("tiefighter", 2)]
        await resumed.aclose()

    asyncio.run(scenario())


def test_streams_are_bounded():
    async def scenario():
        admin = AdminServer()
        service = mount(admin, max_streams=1)
        stream = (await admin.dispatch(get("/map/events"))).stream
        await anext(stream)
        assert (await admin.dispatch(get("/map/events"))).status == 503
        await stream.aclose()
        assert (await admin.dispatch(get("/map/events"))).status == 200
        await service.close()

    asyncio.run(scenario())


def test_missing_vendor_asset_is_a_404_with_a_hint(tmp_path, monkeypatch):
    from l7proxy.depmap import web

    monkeypatch.setattr(web, "STATIC", tmp_path)

    async def scenario():
        admin = AdminServer()
        mount(admin)
        resp = await admin.dispatch(get("/map/static/vendor/cytoscape.min.js"))
        assert resp.status == 404 and b"make setup" in resp.body

    asyncio.run(scenario())


def test_flow_log_to_json_and_dot_through_the_cli(tmp_path, capsys):
    log = tmp_path / "flows.jsonl"
    lines = [json.dumps(http_flow(TIEFIGHTER, DEATHSTAR)), "not json", ""]
    lines.append(json.dumps({"flow": l4_flow(XWING, DEATHSTAR)}))  # hubble observe -o json
    log.write_text("\n".join(lines) + "\n")
    assert main(["map", "--flow-log", str(log)]) == 0
    captured = capsys.readouterr()
    graph = json.loads(captured.out)
    assert sorted(e["source"] for e in graph["edges"]) == ["tiefighter", "xwing"]
    assert "skipped 1 line" in captured.err
    assert main(["map", "--flow-log", str(log), "-o", "dot"]) == 0
    assert '"xwing" -> "deathstar"' in capsys.readouterr().out
    assert read_flow_log(["{}", "[1]"])[1] == 2  # JSON that is not a flow is skipped too


def test_map_cli_reports_an_unreachable_admin(capsys):
    assert main(["map", "--admin", "127.0.0.1:1"]) == 1
    assert "cannot read 127.0.0.1:1/map.json" in capsys.readouterr().err


def test_hold_waits_for_enter_on_a_terminal_and_not_otherwise():
    assert wait_plan(True, {}) is None
    assert wait_plan(False, {}) == 0.0
    assert wait_plan(False, {"DEMO_WAIT": "2.5"}) == 2.5
    assert wait_plan(True, {"DEMO_WAIT": "0"}) == 0.0

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = io.StringIO()
    stdin = Tty("\n")
    hold("http://127.0.0.1:9/map", stdin=stdin, env={}, out=out)
    assert "Service dependency map: http://127.0.0.1:9/map" in out.getvalue()
    assert "press Enter" in out.getvalue() and stdin.read() == ""  # the Enter was consumed
    out = io.StringIO()
    hold("http://x/map", stdin=io.StringIO(), env={}, out=out)
    assert "press Enter" not in out.getvalue()


def test_mount_can_follow_a_shared_flow_log_from_its_end(tmp_path):
    log = tmp_path / "flows.jsonl"
    log.write_text(json.dumps(http_flow(url="/before")) + "\n")

    async def scenario():
        admin = AdminServer()
        service = mount(admin, follow_log=str(log))
        await asyncio.sleep(0.05)
        with log.open("a") as fh:
            fh.write(json.dumps(http_flow(url="/after", sport=5)) + "\n")
        for _ in range(100):
            if service.map.flows_seen:
                break
            await asyncio.sleep(0.05)
        graph = json.loads((await admin.dispatch(get("/map.json"))).body)
        assert [r["http"]["url"] for r in graph["edges"][0]["recent"]] == ["/after"]
        await service.close()

    asyncio.run(scenario())
