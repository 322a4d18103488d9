"""Cilium's Star Wars getting-started: the deathstar serves HTTP, the tiefighter (org=empire)
may request landing, the xwing (org=alliance) may not reach it, and nobody may PUT
/v1/exhaust-port.

Node mode walks through no policy, the L3/L4 policy (the xwing dropped in the kernel) and the
L7 policy (the PUT answered 403 by the node proxy); the cluster part walks the same way across
two lab nodes (`policy_walk`). Gateway mode shows the L7 policy on loopback.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from demo import GATEWAY_L7, L3L4, L7
from demo.gateway import gateway_argv, print_table, show_flows, start_gateway
from demo.node_session import NodeRun
from demo.procs import Children, in_ns, module, shown
from demo.story import Outcome, Story, curl, run_cli
from l7proxy.platform import free_port

SHIPS = {
    "deathstar": "org=empire,class=deathstar",
    "tiefighter": "org=empire,class=tiefighter",
    "xwing": "org=alliance,class=xwing",
}
# Gateway mode: the ships are loopback addresses, the gateway one of its own, so a local
# service on 127.0.0.1 does not collide.
GATEWAY_HOST = "127.0.8.1"
SHIP_ADDRESSES = {"tiefighter": "127.0.0.2", "xwing": "127.0.0.3"}

Ship = Callable[[str, str, str], Outcome]  # (ship, method, path) -> what answered


def expect_landing(story: Story, ship: Ship, name: str, who: str | None = None) -> None:
    o = ship(name, "POST", "v1/request-landing")
    story.expect(who or name, o, "lands", o.code == 200 and "Ship landed" in o.text)


def expect_no_answer(story: Story, ship: Ship, name: str, want: str) -> None:
    o = ship(name, "POST", "v1/request-landing")
    story.expect(name, o, want, o.code is None)


def expect_l7_policy(story: Story, ship: Ship, xwing_want: str) -> None:
    """The three verdicts of the L7 policy, the same in both modes."""
    expect_landing(story, ship, "tiefighter", "tiefighter POST /v1/request-landing")
    o = ship("tiefighter", "PUT", "v1/exhaust-port")
    denied = o.code == 403 and "Access denied" in o.text
    story.expect("tiefighter PUT /v1/exhaust-port", o, "403 Access denied", denied)
    expect_no_answer(story, ship, "xwing", xwing_want)


# -- node mode -----------------------------------------------------------------------------------


def _start_deathstar(story: Story, run: NodeRun) -> str:
    run.create_endpoints(story, SHIPS)
    run_cli(story, run.env, "endpoint", "list")
    run_cli(story, run.env, "identity", "list")
    star = run.ips["deathstar"]
    story.step(f"The deathstar serves HTTP on {star}:80 inside its namespace")
    argv = in_ns(run.netns("deathstar"), module("deathstar", star))
    story.command(shown(argv))
    run.children.start_server(argv)
    return star


def _expect_kernel_drops(story: Story, run: NodeRun) -> None:
    time.sleep(0.3)
    drops = run.agent.client.call(
        "observe", filter={"verdict": "DROPPED", "from_labels": ["class=xwing"]}, last=5
    )
    observe = ("observe", "--verdict", "DROPPED", "--from-label", "class=xwing", "--last", "3")
    run_cli(story, run.env, *observe)
    story.expect(
        "kernel",
        f"{len(drops)} DROPPED events from the BPF program for the xwing",
        "POLICY_DENIED drops reported by BPF",
        bool(drops) and all(d.get("event_type") == "L3_L4" for d in drops),
    )


def policy_walk(
    story: Story,
    ship: Ship,
    import_policy: Callable[[Path], None],
    kernel_drops: Callable[[], None],
) -> None:
    """No policy, the L3/L4 policy, the L7 policy: the node-mode story, on one node or across
    nodes (`import_policy` and `kernel_drops` say where the policy goes and the drops show)."""
    story.step("Without a policy, both ships can land")
    expect_landing(story, ship, "tiefighter")
    expect_landing(story, ship, "xwing")

    story.step("L3/L4 policy: only org=empire may reach the deathstar on TCP/80")
    story.show(L3L4)
    import_policy(L3L4)
    expect_landing(story, ship, "tiefighter")
    expect_no_answer(story, ship, "xwing", "dropped in the kernel (no answer)")
    kernel_drops()

    story.step("L7 policy: empire ships may only POST /v1/request-landing")
    story.show(L7)
    import_policy(L7)
    expect_l7_policy(story, ship, "still dropped in the kernel")


def node_part(story: Story, run: NodeRun) -> None:
    story.step("Endpoints: a namespace with a veth, an IP and labels for each ship")
    star = _start_deathstar(story, run)

    def ship(name: str, method: str, path: str) -> Outcome:
        return curl(story, in_ns(run.netns(name), []), method, f"http://{star}/{path}")

    def import_policy(policy: Path) -> None:
        run_cli(story, run.env, "policy", "import", str(policy))

    policy_walk(story, ship, import_policy, lambda: _expect_kernel_drops(story, run))
    trace = ("--src-endpoint", "tiefighter", "--dst-endpoint", "deathstar", "--dport", "80")
    run_cli(story, run.env, "policy", "trace", *trace, "--http", "PUT", "/v1/exhaust-port")


# -- gateway mode --------------------------------------------------------------------------------


def _gateway_policy() -> tuple[Path, int]:
    """The policy port is the gateway's listener port: root listens on 80 and enforces the very
    file node mode uses; others cannot bind 80 and use the 8080 copy of the same rule."""
    try:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((GATEWAY_HOST, 80))
        return L7, 80
    except OSError:
        return GATEWAY_L7, 8080


def _start(story: Story, children: Children, flow_log: Path) -> int:
    """The deathstar on loopback and the gateway in front of it; returns the gateway's port."""
    policy, port = _gateway_policy()
    star_port = free_port()
    children.start_server(module("deathstar", "127.0.0.1", str(star_port)))
    peers = [f"{SHIP_ADDRESSES[name]}/32={SHIPS[name]}" for name in SHIP_ADDRESSES]
    argv = gateway_argv(
        f"{GATEWAY_HOST}:{port}",
        f"127.0.0.1:{star_port}",
        policy,
        SHIPS["deathstar"],
        peers,
        flow_log,
    )
    story.show(policy)
    start_gateway(story, children, argv, source=SHIP_ADDRESSES["tiefighter"])
    return port


def gateway_part(story: Story) -> None:
    story.step("Gateway mode: `l7proxy gateway` in front of the deathstar, on loopback")
    story.say("The ships are loopback addresses: tiefighter 127.0.0.2, xwing 127.0.0.3;")
    story.say("the gateway gives them identities with --peer. No kernel part runs here.")
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="l7proxy-demo-"))
    children.defer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    try:
        port = _start(story, children, tmp / "flows.jsonl")
        url = f"http://{GATEWAY_HOST}:{port}"

        def ship(name: str, method: str, path: str) -> Outcome:
            return curl(story, [], method, f"{url}/{path}", ("--interface", SHIP_ADDRESSES[name]))

        expect_l7_policy(story, ship, "denied at L3/L4 (connection reset)")
        story.step("Flows (`l7proxy observe --file` reads the gateway's flow log)")
        show_flows(story, tmp / "flows.jsonl", "--last", "20")
        print_table(tmp / "flows.jsonl")
    finally:
        children.close()
        story.step("Clean up: gateway and deathstar stopped")
