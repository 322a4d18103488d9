"""The demo's pieces that need no root: where its files are, its import graph, the map hold,
the broker sweep's notion of a running demo, and the children's cleanup order."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import demo
from demo import broker, kafka_part, lab_session, live_map, procs
from tests.unit.test_import_structure import REPO, find_cycles, module_name, project_edges

MODULES = {module_name(p): p for p in sorted((REPO / "demo").rglob("*.py"))}


def test_policies_are_found_next_to_the_package():
    package = Path(demo.__file__).resolve().parent
    for path in (demo.L3L4, demo.L7, demo.GATEWAY_L7, demo.KAFKA_POLICY, demo.GRPC_POLICY):
        assert path.parent == package and path.is_file(), path


def test_the_demo_has_no_import_circle_and_the_product_is_not_in_it():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in project_edges(MODULES):
        if dst in MODULES:
            graph.setdefault(src, set()).add(dst)
    assert find_cycles(graph) == []
    assert graph["demo.node"] >= {"demo.starwars", "demo.kafka_part", "demo.grpc_part"}


def test_the_programs_it_starts_are_modules_not_source_strings():
    for name, path in MODULES.items():
        text = path.read_text()
        assert '"-c"' not in text and "'-c'" not in text, f"{name} runs a python -c string"
    assert procs.module("deathstar", "10.0.0.1")[1:] == ["-m", "demo.deathstar", "10.0.0.1"]


class _TTY(io.StringIO):
    def __init__(self, text: str = "", tty: bool = True, interrupt: bool = False) -> None:
        super().__init__(text)
        self.tty, self.interrupt, self.reads = tty, interrupt, 0

    def isatty(self) -> bool:
        return self.tty

    def readline(self, *args) -> str:
        self.reads += 1
        if self.interrupt:
            raise KeyboardInterrupt
        return super().readline(*args)


@pytest.fixture
def map_url():
    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/map"
    server.shutdown()
    server.server_close()


def test_without_a_terminal_no_link_is_printed_and_nothing_waits(map_url):
    stdin, out = _TTY("\n", tty=False), io.StringIO()
    live_map.keep_up(map_url, stdin=stdin, env={}, out=out)
    assert map_url not in out.getvalue() and "http" not in out.getvalue()
    assert "goes down with the agent now (stdin is not a terminal)" in out.getvalue()
    assert stdin.reads == 0


def test_on_a_terminal_the_live_link_is_printed_and_enter_ends_the_wait(map_url):
    stdin, out = _TTY("\n"), io.StringIO()
    live_map.keep_up(map_url, stdin=stdin, env={}, out=out)
    assert f"Map live at {map_url} - press Enter (or Ctrl-C) to tear down" in out.getvalue()
    assert stdin.reads == 1


def test_ctrl_c_during_the_wait_is_the_way_out_not_an_error(map_url):
    stdin, out = _TTY(interrupt=True), io.StringIO()
    live_map.keep_up(map_url, stdin=stdin, env={}, out=out)  # no KeyboardInterrupt escapes
    assert stdin.reads == 1


def test_demo_wait_zero_on_a_terminal_says_so(map_url):
    out = io.StringIO()
    live_map.keep_up(map_url, stdin=_TTY("\n"), env={"DEMO_WAIT": "0"}, out=out)
    assert "(DEMO_WAIT=0)" in out.getvalue() and map_url not in out.getvalue()


def test_a_map_that_does_not_answer_is_not_announced_as_live():
    from l7proxy.platform import free_port

    url, stdin, out = f"http://127.0.0.1:{free_port()}/map", _TTY("\n"), io.StringIO()
    live_map.keep_up(url, stdin=stdin, env={}, out=out)
    assert "does not answer" in out.getvalue() and "http" not in out.getvalue()
    assert stdin.reads == 0


def test_a_running_demo_is_told_from_other_processes_by_its_command_line():
    assert broker.is_demo(b"/venv/bin/python\0-m\0demo\0--keep\0")
    assert not broker.is_demo(b"/venv/bin/python\0-m\0demo.deathstar\0")
    assert not broker.is_demo(b"/venv/bin/python\0-m\0l7proxy\0gateway\0")
    assert not broker.is_demo(b"")


def test_kafka_checks_keep_each_mode_s_wording():
    labels = [kafka_part._gateway_label(c) for c in kafka_part.CHECKS]
    assert labels[0] == "empire-hq produces to deathstar-plans"
    assert labels[2] == "empire-outpost consumes empire-announce"
    assert [c.args("b:9092") for c in kafka_part.CHECKS][2:4] == [
        ["consume", "b:9092", "empire-announce"],
        ["produce", "b:9092", "empire-announce", "rebels!"],
    ]


def test_children_are_undone_last_first_and_stopped_as_a_group():
    undone: list[str] = []
    children = procs.Children()
    children.defer(lambda: undone.append("data dir"))
    # a shell that starts a grandchild: stopping the group stops both
    shell = children.start(
        ["sh", "-c", f"{sys.executable} -c 'import time; time.sleep(60)' & wait"]
    )
    children.defer(lambda: undone.append(f"after {shell.poll() is None}"))
    children.close()
    assert undone == ["after True", "data dir"]
    assert shell.poll() is not None
    ps = subprocess.run(["ps", "-o", "pid=", "-g", str(shell.pid)], capture_output=True, text=True)
    assert ps.stdout.strip() == "", "the grandchild survived"


def test_the_deathstar_answers_as_cilium_s_example_does():
    import http.client

    from demo.deathstar import Deathstar, _Server

    server = _Server(("127.0.0.1", 0), Deathstar)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        seen = []
        for method, path in [("POST", "/v1/request-landing"), ("PUT", "/v1/exhaust-port"),
                             ("POST", "/v1/other"), ("GET", "/v1")]:  # fmt: skip
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=5)
            conn.request(method, path, body=b"x" if method != "GET" else None)
            r = conn.getresponse()
            seen.append((r.status, r.read().decode().split(":")[0].strip()))
            conn.close()
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [(200, "Ship landed"), (503, "Panic"), (404, "Not found"), (200, '{"name"')]


def test_commands_are_printed_as_a_user_types_them():
    argv = [sys.executable, "-m", "l7proxy", "--node", "node1", "endpoint", "exec", "deathstar",
            "--", sys.executable, "-m", "demo.deathstar", "10.252.0.2"]  # fmt: skip
    assert procs.shown(argv) == [
        "l7proxy", "--node", "node1", "endpoint", "exec", "deathstar",
        "--", "python", "-m", "demo.deathstar", "10.252.0.2",
    ]  # fmt: skip


@pytest.fixture
def lab_dir(tmp_path, monkeypatch):
    """A lab directory holding a lab's state file (no namespaces, no processes: nothing of it
    is touched, since the demo must leave a lab that is not its own alone)."""
    from l7proxy.lab import state

    monkeypatch.setenv(state.LAB_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(lab_session.processes, "etcd_binary", lambda: "/usr/bin/etcd")
    state.LabState("tunnel", state.CLUSTER_CIDR, "etcd://10.251.0.1:2379", [], 10, {}).save()
    return tmp_path


def test_a_lab_brought_up_by_hand_is_left_alone(lab_dir):
    from demo.story import Story

    problem = lab_session.blocker(Story())
    assert problem and "l7proxy lab down` first" in problem and "--no-cluster" in problem
    assert (lab_dir / "lab.json").exists()


def test_the_lab_of_a_running_demo_is_left_alone(lab_dir):
    from demo.story import Story
    from l7proxy.lab import pidfile

    pidfile.write(lab_dir / lab_session.OWNER_FILE, os.getpid())  # this process: alive
    problem = lab_session.blocker(Story())
    assert problem == f"another demo (pid {os.getpid()}) is running its cluster part"
    assert (lab_dir / "lab.json").exists()


def test_an_interrupt_while_a_child_starts_is_held_until_it_has_started():
    import signal

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        with procs.deferred_interrupts() as held:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered here, in the middle of the start
            started = True
        assert started and held == [signal.SIGTERM]
        with procs.uninterrupted(), procs.deferred_interrupts() as held:
            os.kill(os.getpid(), signal.SIGTERM)  # cleanup ignores it, and so does the start
        assert held == []
        with pytest.raises(KeyboardInterrupt):  # afterwards the demo's handler is back
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, old)
