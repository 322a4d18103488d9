"""The cluster part: the Star Wars story again, with the deathstar on node1 and both ships on node2
of a local lab (`l7proxy lab up --nodes 2`: one etcd, two node namespaces, an agent in each).

The policies are imported on node2 only; they reach node1 through etcd. The xwing's packets cross
the VXLAN tunnel with its identity in the VNI and are dropped by the BPF program on node1, the
deathstar's node (`l7proxy --node node1 observe` shows them); node1's proxy answers the
tiefighter's PUT with 403; `l7proxy cluster status` shows every node on the same policy revision.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

from demo import lab_session, starwars
from demo.lab_session import ClusterRun
from demo.procs import module, shown
from demo.starwars import SHIPS
from demo.story import Outcome, Story, curl, run_cli

NODES = 2
ROUTING = "tunnel"
PLACEMENT = {"deathstar": "node1", "tiefighter": "node2", "xwing": "node2"}
IMPORT_ON = "node2"  # not the deathstar's node: the policy reaches node1 through etcd
CONVERGE_S = 15.0  # every node enforces an imported policy within this (0.4-0.6 s seen here)
EVENTS_S = 3.0  # BPF drop events reach `observe` within this


def _cli_out(*args: str) -> str:
    """`l7proxy ARGS` run quietly (for the data behind a check the demo prints next to it)."""
    try:
        r = subprocess.run(
            [sys.executable, "-m", "l7proxy", *args], capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"l7proxy {' '.join(args)} did not answer within 30 s") from None
    if r.returncode != 0:
        raise RuntimeError(f"l7proxy {' '.join(args)} failed: {(r.stdout + r.stderr).strip()}")
    return r.stdout


def _flows(node: str, *args: str) -> list[dict]:
    out = _cli_out("--node", node, "observe", *args, "-o", "json")
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _in_endpoint(name: str, argv: list[str]) -> list[str]:
    """argv run inside endpoint `name` on its node: `l7proxy --node N endpoint exec NAME --`."""
    node = ["--node", PLACEMENT[name], "endpoint", "exec", name, "--"]
    return [sys.executable, "-m", "l7proxy", *node, *argv]


def _endpoints(story: Story, run: ClusterRun) -> str:
    """Each ship on its node; the deathstar serves HTTP on node1. Returns the deathstar's IP."""
    story.step("Endpoints: the deathstar on node1, tiefighter and xwing on node2")
    for name, labels in SHIPS.items():
        run_cli(
            story, None, "--node", PLACEMENT[name], "endpoint", "create", name, "--labels", labels
        )
    for node in sorted(set(PLACEMENT.values())):
        run_cli(story, None, "--node", node, "endpoint", "list")
        for ep in json.loads(_cli_out("--node", node, "endpoint", "list", "-o", "json")):
            run.ips[ep["name"]], run.identities[ep["name"]] = ep["ip"], ep["identity"]
    star = run.ips["deathstar"]
    story.step(f"The deathstar serves HTTP on {star}:80, on node1")
    argv = _in_endpoint("deathstar", module("deathstar", star))
    story.command(shown(argv))
    run.children.start_server(argv)
    return star


def _converged(revision: int) -> dict | None:
    """`cluster status` once every node enforces `revision` (None until then)."""
    st = json.loads(_cli_out("cluster", "status", "-o", "json"))
    nodes = st["nodes"]
    done = len(nodes) == NODES and all(n["policy_revision"] >= revision for n in nodes)
    return st if done else None


def _import(story: Story, policy: Path) -> None:
    """`policy import` on node2, then wait until every node has that revision in force."""
    out = run_cli(story, None, "--node", IMPORT_ON, "policy", "import", str(policy)).stdout
    revision = int(re.search(r"Revision: (\d+)", out)[1])
    started = time.monotonic()
    while not _converged(revision):
        if time.monotonic() - started > CONVERGE_S:
            story.fail(f"revision {revision} not in force on every node after {CONVERGE_S:.0f} s")
            return
        time.sleep(0.1)
    story.say(f"every node enforces revision {revision} ({time.monotonic() - started:.1f} s)")


def _kernel_drops(story: Story, run: ClusterRun) -> None:
    """The xwing's packets were dropped by BPF on node1, named by the identity node2 gave them."""
    args = ("--verdict", "DROPPED", "--from-label", "class=xwing", "--last", "3")
    deadline = time.monotonic() + EVENTS_S
    while not (drops := _flows("node1", *args)) and time.monotonic() < deadline:
        time.sleep(0.2)
    run_cli(story, None, "--node", "node1", "observe", *args)
    xwing = run.identities["xwing"]
    ok = bool(drops) and all(
        d.get("event_type") == "L3_L4"
        and d.get("traffic_direction") == "INGRESS"
        and d["source"]["identity"] == xwing
        for d in drops
    )
    seen = f"{len(drops)} DROPPED ingress events on node1 for identity {xwing} (the xwing's)"
    story.expect("node1's kernel", seen, "POLICY_DENIED drops by BPF on the deathstar's node", ok)


def _proxy_denial(story: Story, run: ClusterRun) -> None:
    """The 403 came from node1's proxy (the ingress L7 rule is enforced on the destination's
    node), and its flow names the tiefighter on node2 by its identity."""
    run_cli(story, None, "--node", "node1", "observe", "--last", "6")
    denied = [
        f for f in _flows("node1", "--verdict", "DROPPED", "--last", "50")
        if f.get("l7") and "/v1/exhaust-port" in json.dumps(f["l7"])
    ]  # fmt: skip
    ok = bool(denied) and denied[-1]["source"]["identity"] == run.identities["tiefighter"]
    seen = f"PUT /v1/exhaust-port denied by node1's proxy ({len(denied)} http-request DROPPED)"
    story.expect("node1's proxy", seen, "the 403 answered on the deathstar's node", ok)


def _cluster_status(story: Story) -> None:
    run_cli(story, None, "cluster", "status")
    st = json.loads(_cli_out("cluster", "status", "-o", "json"))
    revisions = {n["name"]: n["policy_revision"] for n in st["nodes"]}
    ok = (
        len(revisions) == NODES
        and set(revisions.values()) == {st["revision"]}
        and all(n["health"] == "ok" for n in st["nodes"])
    )
    seen = ", ".join(f"{name} on revision {rev}" for name, rev in sorted(revisions.items()))
    story.expect("cluster status", seen, f"every node on revision {st['revision']}, healthy", ok)


def _story(story: Story, run: ClusterRun) -> None:
    run_cli(story, None, "cluster", "status")
    star = _endpoints(story, run)

    def ship(name: str, method: str, path: str) -> Outcome:
        return curl(story, _in_endpoint(name, []), method, f"http://{star}/{path}")

    story.say(f"The policies are imported on {IMPORT_ON}; etcd carries them to node1.")
    starwars.policy_walk(
        story, ship, lambda policy: _import(story, policy), lambda: _kernel_drops(story, run)
    )
    _proxy_denial(story, run)
    _cluster_status(story)


def cluster_part(story: Story, keep: bool = False, required: bool = False) -> None:
    """The lab, the story on it, and `lab down`. A part that cannot start counts as unexpected;
    a lab that is not the demo's skips the part (an unexpected skip when `required`)."""
    story.step(
        f"Cluster: the deathstar on node1, the ships on node2 (a local lab: etcd, {NODES} node "
        "namespaces with an agent each, VXLAN between them)"
    )
    problem = lab_session.blocker(story)
    if problem and required:
        story.fail(f"the cluster part cannot run: {problem}")
    if problem:
        story.say(f"skipped: {problem}")
        return
    try:
        with lab_session.session(story, NODES, ROUTING, keep) as run:
            _story(story, run)
    except RuntimeError as exc:  # the lab or a command could not start: the count says so
        story.fail(f"the cluster part: {exc}")
