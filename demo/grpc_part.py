"""gRPC: Cloud City's DoorManager, one rule per method (demo/grpc_policy.yaml). A public terminal
may call GetName and RequestMaintenance but not SetAccessCode.

Node mode: the door manager and the terminal are endpoints of the agent. Gateway mode: an HTTP/2
`l7proxy gateway` in front of the door manager on loopback.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from demo import GRPC_POLICY
from demo.gateway import gateway_argv, show_flows, start_gateway
from demo.node_session import NodeRun
from demo.procs import Children, in_ns, module, shown
from demo.story import Story, run_cli, run_client
from l7proxy.platform import free_port

PORT = 50051
GATEWAY_HOST = "127.0.10.1"
CALLS = (("GetName", True), ("RequestMaintenance", True), ("SetAccessCode", False))


def _expect_calls(story: Story, target: str, who: str, netns: str | None = None) -> None:
    for method, allowed in CALLS:
        seen, rc = run_client(story, ["grpc", target, method], netns)
        want = "answered" if allowed else "PERMISSION_DENIED"
        good = rc == 0 if allowed else (rc != 0 and seen.startswith("PERMISSION_DENIED"))
        story.expect(f"{who} {method}", seen, want, good)


def node_setup(story: Story, run: NodeRun) -> None:
    """The door manager and a terminal as endpoints; the doors serve on their endpoint's IP."""
    run.create_endpoints(
        story, {"cc-door-mgr": "app=cc-door-mgr", "terminal": "app=public-terminal"}
    )
    argv = in_ns(run.netns("cc-door-mgr"), module("doors", run.ips["cc-door-mgr"], str(PORT)))
    story.command(shown(argv))
    run.children.start_server(argv)


def node_checks(story: Story, run: NodeRun) -> None:
    story.step("gRPC policy: one rule per DoorManager method")
    story.show(GRPC_POLICY)
    run_cli(story, run.env, "policy", "import", str(GRPC_POLICY))
    _expect_calls(story, f"{run.ips['cc-door-mgr']}:{PORT}", "terminal", run.netns("terminal"))


def gateway_part(story: Story) -> None:
    story.step("gRPC: Cloud City's door manager, one rule per method (gateway mode, HTTP/2)")
    story.show(GRPC_POLICY)
    children = Children()
    tmp = Path(tempfile.mkdtemp(prefix="l7proxy-demo-grpc-"))
    children.defer(lambda: shutil.rmtree(tmp, ignore_errors=True))
    try:
        port = free_port()
        children.start_server(module("doors", "127.0.0.1", str(port)))
        argv = gateway_argv(
            f"{GATEWAY_HOST}:{PORT}", f"127.0.0.1:{port}", GRPC_POLICY, "app=cc-door-mgr",
            ["127.0.0.0/8=app=public-terminal"], tmp / "flows.jsonl", protocol="http2",
        )  # fmt: skip
        start_gateway(story, children, argv)
        _expect_calls(story, f"{GATEWAY_HOST}:{PORT}", "public-terminal")
        show_flows(story, tmp / "flows.jsonl", "--last", "10")
    finally:
        children.close()
