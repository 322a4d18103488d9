"""The dependency map of real traffic: curl-like clients -> `l7proxy gateway` -> a Python backend.

Allowed and denied requests (L7 403s, and L3/L4 resets for a peer and for world) go through a
real gateway; its flow log feeds `l7proxy map --serve`; headless chromium shows the page.
"""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.e2e.test_depmap_browser import browser, start_map_server  # noqa: F401 (fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

POLICY = """apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: web
  namespace: shop
spec:
  endpointSelector:
    matchLabels:
      app: web
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: frontend
    toPorts:
    - ports:
      - port: "{port}"
        protocol: TCP
      rules:
        http:
        - method: GET
          path: "/public/.*"
"""


def requests(port: int, paths: list[str]) -> list[int]:
    """Keep-alive GETs from 127.0.0.1 (the frontend peer); the statuses."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    statuses = []
    for path in paths:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        statuses.append(resp.status)
    conn.close()
    return statuses


def refused_from(source_ip: str, port: int) -> bool:
    """Connect from `source_ip` and send a request: True when the gateway closes without a byte."""
    with socket.socket() as s:
        s.settimeout(5)
        s.bind((source_ip, 0))
        try:
            # The gateway resets right after accept: the RST may even beat connect()'s return.
            s.connect(("127.0.0.1", port))
            s.sendall(b"GET /public/x HTTP/1.1\r\nHost: x\r\n\r\n")
            return s.recv(100) == b""
        except ConnectionResetError:
            return True


def test_map_of_real_gateway_traffic_in_chromium(tmp_path, pybackend, start_gateway, browser):  # noqa: F811
    gw = start_gateway(
        pybackend.port,
        POLICY,
        "--peer", "127.0.0.1/32=app=frontend,io.kubernetes.pod.namespace=shop",
        "--peer", "127.0.0.2/32=app=crawler,io.kubernetes.pod.namespace=shop",
        labels="app=web,io.kubernetes.pod.namespace=shop",
    )  # fmt: skip
    assert requests(gw.port, ["/public/a", "/private", "/public/b", "/private", "/public/c"]) == [
        200, 403, 200, 403, 200,
    ]  # fmt: skip
    assert refused_from("127.0.0.2", gw.port)  # crawler: denied at L3/L4
    assert refused_from("127.0.0.3", gw.port)  # no --peer: world, denied at L3/L4

    server, url = start_map_server(gw.flow_log)
    try:
        browser.navigate(url)
        browser.wait_for("document.querySelectorAll('#edge-list tr[data-edge-id]').length === 3")
        assert browser.eval("document.body.dataset.renderer") == "cytoscape"
        assert browser.nodes() == {"shop/frontend", "shop/web", "shop/crawler", "world"}
        namespace = browser.eval(
            "document.querySelector('#node-list li[data-node-id=\"shop/web\"]').dataset.namespace"
        )
        assert namespace == "shop"
        front = browser.edge_row("shop/frontend", "shop/web", "http")
        assert (front["port"], front["forwarded"], front["dropped"]) == (gw.port, 3, 2)
        crawler = browser.edge_row("shop/crawler", "shop/web", "tcp")
        assert (crawler["forwarded"], crawler["dropped"], crawler["drops"]) == (0, 1, True)
        world = browser.edge_row("world", "shop/web", "tcp")
        assert (world["forwarded"], world["dropped"]) == (0, 1)
        assert browser.drawn_edge(front["id"])["color"] == "rgb(198,40,40)"
        # The namespace is drawn as a compound node around its apps.
        assert browser.eval("depmap.cy.getElementById('n:shop/web').parent().id()") == "ns:shop"

        browser.click_drawn_edge(front["id"])
        browser.wait_for(
            f"document.getElementById('details').dataset.edgeId === {json.dumps(front['id'])}"
        )
        assert browser.flows_shown() == [
            {"verdict": "FORWARDED", "request": "GET /public/c", "result": "200"},
            {"verdict": "DROPPED", "request": "GET /private", "result": "403"},
            {"verdict": "FORWARDED", "request": "GET /public/b", "result": "200"},
            {"verdict": "DROPPED", "request": "GET /private", "result": "403"},
            {"verdict": "FORWARDED", "request": "GET /public/a", "result": "200"},
        ]
        shot = browser.screenshot("depmap-gateway.png")
        assert shot.stat().st_size > 10_000

        browser.eval("window.__noReload = 'same page'")
        assert requests(gw.port, ["/public/d", "/secret", "/public/e"]) == [200, 403, 200]
        browser.wait_for(
            f"+document.querySelector('tr[data-edge-id={json.dumps(front['id'])}]')"
            ".dataset.forwarded === 5"
        )
        row = browser.edge_row("shop/frontend", "shop/web", "http")
        assert (row["forwarded"], row["dropped"]) == (5, 3)
        assert browser.eval("window.__noReload") == "same page"
        assert browser.flows_shown()[0]["request"] == "GET /public/e"
        browser.screenshot("depmap-gateway-after.png")

        # The CLI reads the same map from a live admin port.
        admin = url.removeprefix("http://").removesuffix("/map")
        dot = subprocess.run(
            [sys.executable, "-m", "l7proxy", "map", "--admin", admin, "-o", "dot"],
            capture_output=True, text=True, cwd=REPO, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert '"shop/frontend" -> "shop/web"' in dot
        assert f"http/{gw.port}\\nforwarded 5\\ndropped 3" in dot
    finally:
        server.terminate()
        server.wait(timeout=10)
