"""The live dependency map in real headless chromium, driven over the DevTools protocol (CDP).

Each test opens `/map`, asserts nodes, edges and counts in the DOM (and in the drawn cytoscape
graph), clicks an edge for its recent flows, saves a screenshot under tests/artifacts/, then makes
more flows and asserts the page changed without a reload.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.conftest import REPO, need_binary
from tests.unit.depmap.flows import (
    DEATHSTAR,
    TIEFIGHTER,
    WORLD,
    XWING,
    http_flow,
    kafka_flow,
    l4_flow,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
    "--window-size=1400,1000",
]


class Page:
    """One page target over CDP: commands by id, events ignored."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0

    def send(self, method: str, **params):
        self.next_id += 1
        msg_id = self.next_id
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def eval(self, expression: str):
        result = self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {expression}")
            time.sleep(0.1)

    def navigate(self, url: str) -> None:
        self.send("Page.enable")
        self.send("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'")

    def click(self, x: float, y: float) -> None:
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path = ARTIFACTS / name
        path.write_bytes(base64.b64decode(data))
        return path

    # ---- what the tests read from the map page ----
    def nodes(self) -> set[str]:
        return set(
            self.eval(
                "[...document.querySelectorAll('#node-list li[data-node-id]')]"
                ".map(li => li.dataset.nodeId)"
            )
        )

    def edge_row(self, source: str, target: str, protocol: str) -> dict | None:
        sel = json.dumps(
            f'#edge-list tr[data-source="{source}"][data-target="{target}"]'
            f'[data-protocol="{protocol}"]'
        )
        return self.eval(
            f"(() => {{ const tr = document.querySelector({sel}); if (!tr) return null;"
            " return {id: tr.dataset.edgeId, port: +tr.dataset.port,"
            " forwarded: +tr.querySelector('[data-count=forwarded]').textContent,"
            " dropped: +tr.querySelector('[data-count=dropped]').textContent,"
            " drops: tr.classList.contains('has-drops')}; })()"
        )

    def drawn_edge(self, edge_id: str) -> dict:
        return self.eval(
            f"(() => {{ const e = depmap.cy.getElementById({json.dumps(edge_id)});"
            " return {present: e.nonempty(), color: e.style('line-color'),"
            " label: e.data('label')}; })()"
        )

    def click_drawn_edge(self, edge_id: str) -> None:
        x, y = self.eval(
            f"(() => {{ const p = depmap.cy.getElementById({json.dumps(edge_id)}).renderedMidpoint();"
            " const r = document.getElementById('graph').getBoundingClientRect();"
            " return [r.left + p.x, r.top + p.y]; })()"
        )
        self.click(x, y)

    def flows_shown(self) -> list[dict]:
        return self.eval(
            "[...document.querySelectorAll('#flows tbody tr[data-flow]')].map(tr => ({"
            " verdict: tr.dataset.verdict,"
            " request: tr.querySelector('[data-col=request]').textContent,"
            " result: tr.querySelector('[data-col=result]').textContent}))"
        )


@pytest.fixture
def browser(tmp_path):
    binary = need_binary("chromium")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert proc.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium wrote no DevToolsActivePort"
            time.sleep(0.05)
        port = int(port_file.read_text().split("\n")[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            targets = json.load(resp)
        ws_url = next(t for t in targets if t["type"] == "page")["webSocketDebuggerUrl"]
        with connect(ws_url, max_size=64 << 20, open_timeout=10) as ws:
            yield Page(ws)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start_map_server(flow_log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "l7proxy",
            "map",
            "--serve",
            "127.0.0.1:0",
            "--flow-log",
            str(flow_log),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    line = proc.stdout.readline()
    assert line.startswith("Service dependency map: http://"), (line, proc.stderr.read())
    return proc, line.split(": ", 1)[1].strip()


def append(path: Path, flows) -> None:
    with path.open("a") as fh:
        for flow in flows:
            fh.write(json.dumps(flow) + "\n")


def test_page_draws_flows_from_a_followed_flow_log_and_updates_live(tmp_path, browser):
    """The page against `l7proxy map --serve` on a flow log (no proxy involved)."""
    log = tmp_path / "flows.jsonl"
    append(log, [http_flow(TIEFIGHTER, DEATHSTAR, sport=40000 + i) for i in range(3)])
    append(
        log,
        [
            http_flow(
                TIEFIGHTER,
                DEATHSTAR,
                verdict="DROPPED",
                method="PUT",
                url="/v1/exhaust-port",
                code=403,
            ),
            l4_flow(XWING, DEATHSTAR),
            kafka_flow(WORLD, DEATHSTAR, topic="deathstar-plans"),
        ],
    )
    server, url = start_map_server(log)
    try:
        browser.navigate(url)
        browser.wait_for("document.querySelectorAll('#edge-list tr[data-edge-id]').length === 3")
        assert browser.eval("document.body.dataset.renderer") == "cytoscape"
        assert browser.nodes() == {"deathstar", "tiefighter", "xwing", "world"}
        tie = browser.edge_row("tiefighter", "deathstar", "http")
        assert (tie["port"], tie["forwarded"], tie["dropped"], tie["drops"]) == (80, 3, 1, True)
        xw = browser.edge_row("xwing", "deathstar", "tcp")
        assert (xw["forwarded"], xw["dropped"], xw["drops"]) == (0, 1, True)
        drawn = browser.drawn_edge(tie["id"])
        assert drawn["present"] and drawn["color"] == "rgb(198,40,40)"  # drops stand out
        assert "\u27133" in drawn["label"] and "\u27171" in drawn["label"]

        browser.click_drawn_edge(tie["id"])
        browser.wait_for(
            f"document.getElementById('details').dataset.edgeId === {json.dumps(tie['id'])}"
        )
        shown = browser.flows_shown()
        assert shown[0] == {
            "verdict": "DROPPED",
            "request": "PUT /v1/exhaust-port",
            "result": "403",
        }
        assert [f["request"] for f in shown[1:]] == ["POST /v1/request-landing"] * 3
        kafka = browser.edge_row("world", "deathstar", "kafka")
        browser.eval(
            f"document.querySelector('tr[data-edge-id={json.dumps(kafka['id'])}]').click()"
        )
        assert browser.flows_shown()[0]["request"] == "kafka produce deathstar-plans"
        browser.screenshot("depmap-flow-log.png")

        browser.eval("window.__noReload = 'still here'")
        browser.eval(f"depmap.select({json.dumps(tie['id'])})")
        append(
            log,
            [http_flow(TIEFIGHTER, DEATHSTAR, url="/v1/late", sport=50000 + i) for i in range(2)],
        )
        browser.wait_for(
            f"+document.querySelector('tr[data-edge-id={json.dumps(tie['id'])}]').dataset.forwarded === 5"
        )
        assert browser.eval("window.__noReload") == "still here"
        assert browser.flows_shown()[0]["request"] == "POST /v1/late"  # the open panel follows too
        assert browser.eval("document.getElementById('totals').dataset.forwarded") == "6"
        # A new service appears live, in the list and in the drawing.
        append(log, [http_flow((1099, ["k8s:app=probe"]), DEATHSTAR)])
        browser.wait_for("!!document.querySelector('#node-list li[data-node-id=\"probe\"]')")
        assert browser.eval("depmap.cy.getElementById('n:probe').nonempty()")
        assert browser.eval("window.__noReload") == "still here"
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_page_degrades_to_html_lists_without_the_vendored_renderer(tmp_path, browser):
    """A machine where setup could not fetch cytoscape.js still gets a usable, live page."""
    log = tmp_path / "flows.jsonl"
    append(log, [http_flow(TIEFIGHTER, DEATHSTAR), l4_flow(XWING, DEATHSTAR)])
    server, url = start_map_server(log)
    try:
        browser.send("Network.enable")
        browser.send("Network.setBlockedURLs", urls=["*cytoscape.min.js"])
        browser.navigate(url)
        browser.wait_for("document.querySelectorAll('#edge-list tr[data-edge-id]').length === 2")
        assert browser.eval("document.body.dataset.renderer") == "html"
        assert browser.eval("typeof window.cytoscape") == "undefined"
        assert browser.nodes() == {"deathstar", "tiefighter", "xwing"}
        xw = browser.edge_row("xwing", "deathstar", "tcp")
        assert (xw["dropped"], xw["drops"]) == (1, True)
        red = browser.eval(
            "getComputedStyle(document.querySelector('.has-drops [data-count=dropped]')).color"
        )
        assert red == "rgb(198, 40, 40)"
        tie = browser.edge_row("tiefighter", "deathstar", "http")
        browser.eval(f"document.querySelector('tr[data-edge-id={json.dumps(tie['id'])}]').click()")
        assert browser.flows_shown()[0]["request"] == "POST /v1/request-landing"
        append(log, [http_flow(TIEFIGHTER, DEATHSTAR, sport=7)])
        browser.wait_for(
            f"+document.querySelector('tr[data-edge-id={json.dumps(tie['id'])}]').dataset.forwarded === 2"
        )
        browser.screenshot("depmap-html-fallback.png")
    finally:
        server.terminate()
        server.wait(timeout=10)
