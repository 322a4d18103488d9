"""`make demo`: Cilium's Star Wars getting-started on real namespaces, with one command.

With root and BPF: an agent (node mode) makes the endpoints deathstar, tiefighter and xwing as
network namespaces; the L3/L4 policy drops the xwing in the kernel, the L7 policy lets the
tiefighter request landing and answers its PUT /v1/exhaust-port with 403 Access denied. Without
root or BPF it says so and runs the same story through `l7proxy gateway` on loopback.

Every step prints the command it runs and the verdict it actually saw; a verdict that differs
from what the policy promises is marked and makes the demo exit 1. Everything it made is removed
at the end, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "demo"
L3L4 = DEMO / "sw_l3_l4_policy.yaml"
L7 = DEMO / "sw_l3_l4_l7_policy.yaml"
GATEWAY_L7 = DEMO / "gateway_sw_policy.yaml"
CURL_TIMEOUT = 2
# A loopback address of its own, so a local service on 127.0.0.1 does not collide.
GATEWAY_HOST = "127.0.8.1"

SHIPS = {
    "deathstar": "org=empire,class=deathstar",
    "tiefighter": "org=empire,class=tiefighter",
    "xwing": "org=alliance,class=xwing",
}


# -- the deathstar: a tiny HTTP service (runs inside its namespace) ----------------------------


class Deathstar(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _answer(self, code: int, text: str) -> None:
        body = text.encode()
        self.send_response(code)
        self.send_header("content-type", "text/plain")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/v1/request-landing":
            self._answer(200, "Ship landed\n")
        else:
            self._answer(404, "Not found\n")

    def do_PUT(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length") or 0))
        if self.path == "/v1/exhaust-port":
            self._answer(503, "Panic: deathstar exploded\n")
        else:
            self._answer(404, "Not found\n")

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, '{"name": "Death Star", "model": "DS-1 Orbital Battle Station"}\n')

    def log_message(self, *args) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name; a fresh namespace has no DNS to ask.
        import socketserver

        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def serve_deathstar(host: str, port: int) -> None:
    server = _Server((host, port), Deathstar)
    print("listening", flush=True)
    server.serve_forever()


# -- printing ------------------------------------------------------------------------------------


@dataclass
class Outcome:
    text: str
    code: int | None  # HTTP status, None when nothing answered


class Story:
    def __init__(self) -> None:
        self.failures: list[str] = []
        self.checks = 0

    def step(self, title: str) -> None:
        print(f"\n=== {title}", flush=True)

    def say(self, text: str) -> None:
        print(f"    {text}", flush=True)

    def command(self, argv: list[str]) -> None:
        print(f"$ {shlex.join(argv)}", flush=True)

    def expect(self, who: str, seen: Outcome, want: str, ok: bool) -> None:
        self.checks += 1
        mark = "ok" if ok else "UNEXPECTED"
        print(f"    -> {who}: {seen.text}   [expected: {want}: {mark}]", flush=True)
        if not ok:
            self.failures.append(f"{who}: saw {seen.text!r}, expected {want}")


def run_cli(story: Story, env: dict, *args: str, show: bool = True) -> subprocess.CompletedProcess:
    argv = ["l7proxy", *args]
    story.command(argv)
    r = subprocess.run(
        [sys.executable, "-m", "l7proxy", *args], capture_output=True, text=True, env=env
    )
    out = (r.stdout + r.stderr).rstrip()
    if show and out:
        print(out, flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"l7proxy {' '.join(args)} failed (exit {r.returncode}): {out}")
    return r


def curl(story: Story, prefix: list[str], method: str, url: str, extra=()) -> Outcome:
    argv = [*prefix, "curl", "-s", "-m", str(CURL_TIMEOUT), "-X", method, *extra, url]
    shown = argv[len(prefix) - 1 :] if prefix else argv
    story.command(["ip", "netns", "exec", *shown] if prefix else shown)
    with tempfile.NamedTemporaryFile() as body:
        r = subprocess.run(
            [*argv, "-o", body.name, "-w", "%{http_code}"], capture_output=True, text=True
        )
        text = Path(body.name).read_text(errors="replace").strip()
    if r.returncode == 28:
        return Outcome(f"no answer within {CURL_TIMEOUT}s (packets dropped)", None)
    if r.returncode in (7, 52, 56):
        return Outcome(f"connection refused or reset (curl exit {r.returncode})", None)
    if r.returncode != 0:
        return Outcome(f"curl failed (exit {r.returncode}): {r.stderr.strip()}", None)
    code = int(r.stdout or 0)
    if text:
        print(text, flush=True)
    return Outcome(f"HTTP {code} {text}", code)


# -- node mode: the agent, real namespaces, BPF --------------------------------------------------


def flows_table(story: Story, agent, title: str, exclude: set | None = None) -> set:
    """Print the flows `l7proxy observe` has (folded, forwarded L3/L4 events left out); return
    the keys of those shown so a later table can skip them."""
    from l7proxy.agent.flowlog import table

    story.step(f"{title}, as `l7proxy observe` sees them (BPF L3/L4 events and proxy L7 flows)")
    time.sleep(0.3)
    flows = agent.client.call("observe", last=10_000)
    keys = {(f.get("time"), f.get("Summary")) for f in flows}
    fresh = [f for f in flows if (f.get("time"), f.get("Summary")) not in (exclude or set())]
    shown = [f for f in fresh if f.get("verdict") != "FORWARDED" or f.get("l7")]
    print(table(shown, collapse=True))
    story.say(f"({len(fresh)} flows; forwarded L3/L4 events left out, identical ones folded)")
    return keys


def node_demo(story: Story, pool: str, prefix: str, keep: bool) -> None:
    from tests.agent_runner import AgentProcess

    story.step("Start the agent (node mode: BPF on every endpoint veth, one transparent proxy)")
    agent = AgentProcess(pool=pool, prefix=prefix, bpf=True)
    from l7proxy.demo_l7parts import sweep_brokers
    from tests.agent_runner import sweep_namespaces

    stale = sweep_namespaces(prefix)  # an earlier run killed with SIGKILL cannot clean up
    stale += [f"broker pid {pid}" for pid in sweep_brokers(prefix)]
    if agent.pin_dir.exists():
        shutil.rmtree(agent.pin_dir, ignore_errors=True)
        stale.append(str(agent.pin_dir))
    if stale:
        story.say(f"removed leftovers of an earlier run: {', '.join(stale)}")
    story.command(["l7proxy", "agent", "--mode", "node", "--pool", pool, "--netns-prefix", prefix])
    from l7proxy.demo_l7parts import start_group

    procs: list[subprocess.Popen] = []
    agent.start()
    try:
        env = agent.env
        run_cli(story, env, "status")

        story.step("Endpoints: a namespace with a veth, an IP and labels for each ship")
        ips = {}
        for name, labels in SHIPS.items():
            run_cli(story, env, "endpoint", "create", name, "--labels", labels)
        for ep in json.loads(agent.cli("endpoint", "list", "-o", "json").stdout):
            ips[ep["name"]] = ep["ip"]
        run_cli(story, env, "endpoint", "list")
        run_cli(story, env, "identity", "list")

        star = ips["deathstar"]
        story.step(f"The deathstar serves HTTP on {star}:80 inside its namespace")
        server_cmd = [sys.executable, "-m", "l7proxy.demo", "--serve-deathstar", star]
        story.command(["ip", "netns", "exec", prefix + "deathstar", "python", *server_cmd[1:]])
        server = start_group(
            ["ip", "netns", "exec", prefix + "deathstar", *server_cmd],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(server)
        if server.stdout.readline().strip() != "listening":
            raise RuntimeError("the deathstar server did not start")

        def ship(name: str, method: str, path: str) -> Outcome:
            ns = ["ip", "netns", "exec", prefix + name]
            return curl(story, ns, method, f"http://{star}/{path}")

        def landed(o: Outcome) -> bool:
            return o.code == 200 and "Ship landed" in o.text

        story.step("Without a policy, both ships can land")
        o = ship("tiefighter", "POST", "v1/request-landing")
        story.expect("tiefighter", o, "lands", landed(o))
        o = ship("xwing", "POST", "v1/request-landing")
        story.expect("xwing", o, "lands", landed(o))

        story.step("L3/L4 policy: only org=empire may reach the deathstar on TCP/80")
        print(L3L4.read_text().strip())
        run_cli(story, env, "policy", "import", str(L3L4))
        o = ship("tiefighter", "POST", "v1/request-landing")
        story.expect("tiefighter", o, "lands", landed(o))
        o = ship("xwing", "POST", "v1/request-landing")
        story.expect("xwing", o, "dropped in the kernel (no answer)", o.code is None)
        time.sleep(0.3)
        drops = agent.client.call(
            "observe", filter={"verdict": "DROPPED", "from_labels": ["class=xwing"]}, last=5
        )
        run_cli(
            story,
            env,
            "observe",
            "--verdict",
            "DROPPED",
            "--from-label",
            "class=xwing",
            "--last",
            "3",
        )
        story.expect(
            "kernel",
            Outcome(f"{len(drops)} DROPPED events from the BPF program for the xwing", None),
            "POLICY_DENIED drops reported by BPF",
            bool(drops) and all(d.get("event_type") == "L3_L4" for d in drops),
        )

        story.step("L7 policy: empire ships may only POST /v1/request-landing")
        print(L7.read_text().strip())
        run_cli(story, env, "policy", "import", str(L7))
        o = ship("tiefighter", "POST", "v1/request-landing")
        story.expect("tiefighter POST /v1/request-landing", o, "lands", landed(o))
        o = ship("tiefighter", "PUT", "v1/exhaust-port")
        story.expect(
            "tiefighter PUT /v1/exhaust-port",
            o,
            "403 Access denied",
            o.code == 403 and "Access denied" in o.text,
        )
        o = ship("xwing", "POST", "v1/request-landing")
        story.expect("xwing", o, "still dropped in the kernel", o.code is None)
        run_cli(
            story,
            env,
            "policy",
            "trace",
            "--src-endpoint",
            "tiefighter",
            "--dst-endpoint",
            "deathstar",
            "--dport",
            "80",
            "--http",
            "PUT",
            "/v1/exhaust-port",
        )

        star_wars = flows_table(story, agent, "The Star Wars flows")

        from l7proxy.demo_l7parts import node_parts

        node_parts(story, agent, run_cli, procs)

        story.step("Metrics (Cilium's names)")
        metrics = agent.client.call("metrics")
        for line in metrics.splitlines():
            if line.startswith(
                ("drop_count_total", "forward_count_total", "policy_l7_total", "proxy_redirects")
            ) or line.startswith(("policy_change_total", "endpoint_count", "identity_count")):
                print(f"    {line}")

        flows_table(story, agent, "The Kafka and gRPC flows", exclude=star_wars)

        url = f"http://{agent.client.call('status')['parts']['admin']['detail']}/map"
        with contextlib.suppress(Exception):
            from l7proxy.depmap import hold

            hold(url)
        if keep:
            story.say(f"--keep: leaving agent pid {agent.proc.pid} and {prefix}* namespaces up")
            procs.clear()
            return
    finally:
        from l7proxy.demo_l7parts import stop

        with _uninterrupted():
            for proc in reversed(procs):  # the broker before its data directory
                with contextlib.suppress(Exception):
                    if isinstance(proc, subprocess.Popen):
                        stop(proc)
                    else:
                        proc()  # a cleanup callback
        if story.failures:
            story.step("Something was unexpected: the agent's log ends with")
            print("\n".join(agent.log().splitlines()[-25:]))
        if not keep:
            story.step("Clean up: endpoints, namespaces, pinned maps, the agent")
            with _uninterrupted():
                agent.close()
            story.say("done")


@contextlib.contextmanager
def _uninterrupted():
    """Cleanup must finish: a second Ctrl-C or SIGTERM during it would leave namespaces behind."""
    old = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


# -- gateway mode: no root or no BPF -------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _wait_port(host: str, port: int, source: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError),
            socket.create_connection((host, port), timeout=0.5, source_address=(source, 0)),
        ):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


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


def gateway_demo(story: Story) -> None:
    from l7proxy.agent.flowlog import table

    story.step("Gateway mode: `l7proxy gateway` in front of the deathstar, on loopback")
    story.say("The ships are loopback addresses: tiefighter 127.0.0.2, xwing 127.0.0.3;")
    story.say("the gateway gives them identities with --peer. No kernel part runs here.")
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="l7proxy-demo-"))
    try:
        policy, port = _gateway_policy()
        star_port = _free_port("127.0.0.1")
        server = subprocess.Popen(
            [
                sys.executable,
                "-c",
                f"from l7proxy.demo import serve_deathstar; serve_deathstar('127.0.0.1', {star_port})",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(server)
        server.stdout.readline()
        flow_log = tmp / "flows.jsonl"
        gw = [
            "gateway",
            "--listen",
            f"{GATEWAY_HOST}:{port}",
            "--upstream",
            f"127.0.0.1:{star_port}",
            "--policy",
            str(policy),
            "--labels",
            SHIPS["deathstar"],
            "--peer",
            f"127.0.0.2/32={SHIPS['tiefighter']}",
            "--peer",
            f"127.0.0.3/32={SHIPS['xwing']}",
            "--flow-log",
            str(flow_log),
        ]
        story.command(["l7proxy", *gw])
        print(policy.read_text().strip())
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "l7proxy", *gw],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        _wait_port(GATEWAY_HOST, port, "127.0.0.2")  # as the tiefighter

        def ship(src: str, method: str, path: str) -> Outcome:
            return curl(
                story, [], method, f"http://{GATEWAY_HOST}:{port}/{path}", ("--interface", src)
            )

        o = ship("127.0.0.2", "POST", "v1/request-landing")
        story.expect("tiefighter POST /v1/request-landing", o, "lands", o.code == 200)
        o = ship("127.0.0.2", "PUT", "v1/exhaust-port")
        story.expect(
            "tiefighter PUT /v1/exhaust-port",
            o,
            "403 Access denied",
            o.code == 403 and "Access denied" in o.text,
        )
        o = ship("127.0.0.3", "POST", "v1/request-landing")
        story.expect("xwing", o, "denied at L3/L4 (connection reset)", o.code is None)

        story.step("Flows (`l7proxy observe --file` reads the gateway's flow log)")
        time.sleep(0.3)
        run_cli(story, dict(os.environ), "observe", "--file", str(flow_log), "--last", "20")
        flows = [json.loads(line) for line in flow_log.read_text().splitlines() if line]
        print(table(flows))
    finally:
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.terminate()
                proc.wait(5)
        shutil.rmtree(tmp, ignore_errors=True)
        story.step("Clean up: gateway and deathstar stopped")


def extras(story: Story) -> None:
    """The Kafka and gRPC parts (gateway mode; see l7proxy/demo_l7parts.py for why)."""
    from l7proxy import demo_l7parts

    for part in (demo_l7parts.kafka_part, demo_l7parts.grpc_part):
        try:
            part(story, run_cli, dict(os.environ))
        except (RuntimeError, OSError) as exc:
            story.failures.append(f"{part.__name__}: {exc}")
            print(f"    UNEXPECTED: {exc}", flush=True)


def _why_no_kernel() -> str | None:
    from l7proxy.agent.datapath_choice import bpf_problem

    return bpf_problem()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m l7proxy.demo", description=__doc__.split("\n")[0])
    p.add_argument("--gateway", action="store_true", help="run only the gateway-mode part")
    p.add_argument("--keep", action="store_true", help="leave the agent and namespaces running")
    p.add_argument("--pool", default=os.environ.get("L7PROXY_DEMO_POOL", "10.251.10.0/24"))
    p.add_argument("--prefix", default=os.environ.get("L7PROXY_DEMO_PREFIX", "l7demo-"))
    p.add_argument(
        "--no-extras", action="store_true", help="gateway mode: skip the Kafka and gRPC parts"
    )
    p.add_argument("--serve-deathstar", metavar="IP", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_deathstar:
        serve_deathstar(args.serve_deathstar, 80)
        return 0

    # SIGTERM (CI timeouts, kill) unwinds like Ctrl-C, so the finally blocks clean up.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    from l7proxy import demo_l7parts

    demo_l7parts.RUN_TAG = args.prefix  # names the brokers' data dirs (tests look for them)
    story = Story()
    started = time.monotonic()
    print("l7proxy demo: Cilium's Star Wars getting-started (deathstar, tiefighter, xwing)")
    problem = None if args.gateway else _why_no_kernel()
    try:
        if args.gateway:
            print("Running the gateway-mode part only (--gateway).")
            gateway_demo(story)
        elif problem:
            print(f"No kernel datapath here: {problem}. Running the gateway-mode part instead.")
            gateway_demo(story)
        else:
            print("Root and BPF present: real namespaces, BPF on the veths, node-mode proxy.")
            node_demo(story, args.pool, args.prefix, args.keep)
        if problem or args.gateway:
            if not args.no_extras:
                extras(story)
    except KeyboardInterrupt:
        print("\ninterrupted; cleaned up", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a part could not start (agent, server, broker): say which
        print(f"\nthe demo could not continue: {exc}", file=sys.stderr)
        return 1
    took = time.monotonic() - started
    print(f"\n{story.checks} checks, {len(story.failures)} unexpected, {took:.1f} s")
    for failure in story.failures:
        print(f"UNEXPECTED: {failure}")
    return 1 if story.failures else 0


if __name__ == "__main__":
    sys.exit(main())
