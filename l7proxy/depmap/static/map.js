// The live dependency map: /map.json once, then deltas from /map/events (SSE), no reload.
// The HTML lists are always kept (stable DOM hooks, and the whole view when cytoscape.js is
// missing); the graph is drawn with cytoscape.js when it was vendored at setup time.
// Every value from the server goes into the DOM through textContent, never innerHTML.
"use strict";

(function () {
  const state = { epoch: "", version: 0, nodes: new Map(), edges: new Map(), selected: "" };
  const $ = (sel) => document.querySelector(sel);
  let cy = null;
  let layoutPending = false;
  let laidOut = false; // after the first layout, keep positions so a live update doesn't jump

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function nodeName(id) {
    const n = state.nodes.get(id);
    return n ? (n.namespace ? n.namespace + "/" + n.name : n.name) : id;
  }

  function edgeLabel(e) {
    let label = e.protocol + "/" + e.port + "  \u2713" + e.forwarded;
    if (e.dropped) label += "  \u2717" + e.dropped;
    if (e.errors) label += "  !" + e.errors;
    return label;
  }

  // ---- cytoscape rendering (optional) ----
  function startGraph() {
    if (typeof window.cytoscape !== "function") {
      document.body.dataset.renderer = "html";
      return;
    }
    cy = window.cytoscape({
      container: $("#graph"),
      wheelSensitivity: 0.3,
      style: [
        { selector: "node", style: {
          "label": "data(label)", "text-valign": "center", "text-halign": "center",
          "shape": "round-rectangle", "width": "label", "height": 32, "padding": "10px",
          "background-color": "#e3f2fd", "border-width": 1, "border-color": "#1565c0", "font-size": 16 } },
        { selector: "node[kind = 'world']", style: { "shape": "ellipse", "background-color": "#fff3e0", "border-color": "#ef6c00" } },
        { selector: "node[kind = 'host']", style: { "shape": "hexagon", "background-color": "#eceff1", "border-color": "#37474f" } },
        { selector: "node[kind = 'namespace']", style: {
          "shape": "round-rectangle", "background-color": "#fafafa", "border-style": "dashed",
          "text-valign": "top", "color": "#666" } },
        { selector: "edge", style: {
          "label": "data(label)", "curve-style": "bezier", "target-arrow-shape": "triangle",
          "width": 2, "line-color": "#90a4ae", "target-arrow-color": "#90a4ae", "font-size": 13,
          "text-background-color": "#fff", "text-background-opacity": 0.85, "text-background-padding": "2px" } },
        { selector: "edge[dropped > 0]", style: { "line-color": "#c62828", "target-arrow-color": "#c62828", "color": "#c62828", "width": 3 } },
        { selector: "edge:selected", style: { "line-color": "#1565c0", "target-arrow-color": "#1565c0", "width": 4 } },
      ],
    });
    cy.on("tap", "edge", (evt) => select(evt.target.id()));
    document.body.dataset.renderer = "cytoscape";
  }

  function drawNode(n) {
    if (!cy) return;
    const data = { id: "n:" + n.id, label: n.name, kind: n.kind };
    if (n.namespace) {
      const parent = "ns:" + n.namespace;
      if (cy.getElementById(parent).empty()) {
        cy.add({ group: "nodes", data: { id: parent, label: "namespace " + n.namespace, kind: "namespace" } });
      }
      data.parent = parent;
    }
    const existing = cy.getElementById(data.id);
    if (existing.empty()) {
      const added = cy.add({ group: "nodes", data });
      if (laidOut) {
        // Start a newcomer somewhere inside the drawing; the layout then settles it.
        const box = cy.elements().boundingBox();
        added.position({ x: box.x1 + Math.random() * box.w, y: box.y1 + Math.random() * box.h });
      }
      layoutPending = true;
    } else {
      existing.data(data);
    }
  }

  function drawEdge(e) {
    if (!cy) return;
    const data = { id: e.id, source: "n:" + e.source, target: "n:" + e.target,
                   label: edgeLabel(e), dropped: e.dropped };
    const existing = cy.getElementById(e.id);
    if (existing.empty()) {
      cy.add({ group: "edges", data });
      layoutPending = true;
    } else {
      existing.data(data);
    }
  }

  function relayout() {
    if (!cy || !layoutPending) return;
    layoutPending = false;
    cy.layout({ name: "cose", animate: false, padding: 40, randomize: !laidOut,
                nodeDimensionsIncludeLabels: true, nodeRepulsion: () => 400000,
                idealEdgeLength: () => 140, edgeElasticity: () => 100, nodeOverlap: 40 }).run();
    laidOut = true;
    // A few nodes would otherwise be fitted at a huge zoom.
    if (cy.zoom() > 1.25) {
      cy.zoom(1.25);
      cy.center();
    }
  }

  // ---- HTML lists (always) ----
  function renderNodeRow(n) {
    const li = el("li", { "data-node-id": n.id, "data-kind": n.kind, "data-namespace": n.namespace });
    if (n.namespace) li.append(el("span", { class: "namespace" }, n.namespace + "/"));
    li.append(el("span", { class: "name" }, n.name));
    li.append(" ", el("span", { class: "kind" }, "(" + n.kind + ")"));
    li.title = n.labels.join("\n") + "\nidentities: " + n.identities.join(", ");
    return li;
  }

  function renderEdgeRow(e) {
    const tr = el("tr", {
      "data-edge-id": e.id, "data-source": e.source, "data-target": e.target,
      "data-protocol": e.protocol, "data-port": e.port,
      "data-forwarded": e.forwarded, "data-dropped": e.dropped, "data-errors": e.errors,
    });
    if (e.dropped) tr.classList.add("has-drops");
    if (e.id === state.selected) tr.classList.add("selected");
    tr.append(el("td", { "data-col": "source" }, nodeName(e.source)));
    tr.append(el("td", { "data-col": "target" }, nodeName(e.target)));
    tr.append(el("td", { "data-col": "protocol" }, e.protocol + "/" + e.port));
    tr.append(el("td", { "data-count": "forwarded" }, e.forwarded));
    tr.append(el("td", { "data-count": "dropped" }, e.dropped));
    tr.append(el("td", { "data-count": "errors" }, e.errors));
    tr.append(el("td", { "data-col": "last-seen" }, e.last_seen));
    tr.addEventListener("click", () => select(e.id));
    return tr;
  }

  function upsert(container, selector, row) {
    const old = container.querySelector(selector);
    if (old) old.replaceWith(row); else container.append(row);
  }

  function renderTotals() {
    let forwarded = 0, dropped = 0;
    for (const e of state.edges.values()) { forwarded += e.forwarded; dropped += e.dropped; }
    const t = $("#totals");
    Object.assign(t.dataset, { nodes: state.nodes.size, edges: state.edges.size, forwarded, dropped });
    t.textContent = `${state.nodes.size} nodes, ${state.edges.size} edges, ` +
                    `${forwarded} forwarded, ${dropped} dropped`;
  }

  // ---- the recent flows of the selected edge ----
  function request(f) {
    if (f.http) return (f.http.method || "") + " " + (f.http.url || "");
    if (f.kafka) return "kafka " + (f.kafka.api_key || "") + (f.kafka.topic ? " " + f.kafka.topic : "");
    return f.summary || "";
  }

  function result(f) {
    if (f.http && f.http.grpc && f.http.grpc.status) return f.http.code + " grpc " + f.http.grpc.status;
    if (f.http && f.http.code !== undefined) return String(f.http.code);
    if (f.kafka && f.kafka.error_code !== undefined) return "error_code " + f.kafka.error_code;
    return f.drop_reason || "";
  }

  function renderDetails() {
    const e = state.edges.get(state.selected);
    const body = $("#flows tbody");
    $("#details").dataset.edgeId = e ? e.id : "";
    $("#flows").hidden = !e;
    $("#details-hint").hidden = !!e;
    body.replaceChildren();
    if (!e) return;
    $("#details-title").textContent = `Recent flows: ${nodeName(e.source)} \u2192 ${nodeName(e.target)} ` +
                                      `(${e.protocol}/${e.port})`;
    for (const f of e.recent || []) {
      const tr = el("tr", { "data-flow": "", "data-verdict": f.verdict });
      const time = el("td", { title: f.time }, (f.time || "").replace(/^.*T/, "").replace(/(\.\d{3})\d*/, "$1"));
      tr.append(time, el("td", { class: "verdict-" + f.verdict }, f.verdict),
                el("td", { "data-col": "request" }, request(f)), el("td", { "data-col": "result" }, result(f)),
                el("td", {}, f.source));
      body.append(tr);
    }
  }

  function select(id) {
    state.selected = id;
    for (const tr of document.querySelectorAll("#edge-list tr.selected")) tr.classList.remove("selected");
    const row = document.querySelector(`#edge-list tr[data-edge-id="${CSS.escape(id)}"]`);
    if (row) row.classList.add("selected");
    if (cy) { cy.elements().unselect(); cy.getElementById(id).select(); }
    renderDetails();
  }

  // ---- applying a snapshot or a delta ----
  function reset() {
    // The server restarted (new epoch): its versions and counts start over, so do we.
    state.nodes.clear();
    state.edges.clear();
    state.version = 0;
    $("#node-list").replaceChildren();
    $("#edge-list tbody").replaceChildren();
    if (cy) cy.elements().remove();
    renderDetails();
  }

  function apply(delta) {
    if (delta.epoch !== state.epoch) {
      if (state.epoch) reset();
      state.epoch = delta.epoch;
    } else if (delta.version <= state.version) {
      return;
    }
    for (const n of delta.nodes) {
      state.nodes.set(n.id, n);
      upsert($("#node-list"), `li[data-node-id="${CSS.escape(n.id)}"]`, renderNodeRow(n));
      drawNode(n);
    }
    for (const e of delta.edges) {
      state.edges.set(e.id, e);
      upsert($("#edge-list tbody"), `tr[data-edge-id="${CSS.escape(e.id)}"]`, renderEdgeRow(e));
      drawEdge(e);
      if (e.id === state.selected) renderDetails();
    }
    state.version = delta.version;
    document.body.dataset.version = state.version;
    renderTotals();
    relayout();
  }

  function listen() {
    const since = encodeURIComponent(state.epoch + "-" + state.version);
    const source = new EventSource("/map/events?since=" + since);
    const status = $("#status");
    source.addEventListener("open", () => { status.dataset.state = "live"; status.textContent = "live"; });
    source.addEventListener("changes", (msg) => apply(JSON.parse(msg.data)));
    source.addEventListener("error", () => {
      // EventSource reconnects by itself, sending Last-Event-ID (the version) so no change is
      // lost; after an error answer (say 503, too many streams) it gives up, so we retry.
      status.dataset.state = "error";
      status.textContent = "reconnecting";
      if (source.readyState === EventSource.CLOSED) setTimeout(listen, 5000);
    });
  }

  async function start() {
    startGraph();
    try {
      const response = await fetch("/map.json", { cache: "no-store" });
      apply(await response.json());
    } catch (err) {
      $("#status").dataset.state = "error";
      $("#status").textContent = "could not load /map.json: " + err;
    }
    listen();
  }

  window.depmap = { state, get cy() { return cy; }, apply, select };
  start();
})();
