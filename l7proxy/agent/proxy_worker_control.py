"""The agent's control of the proxy worker process (`--proxy-worker process`): start or re-attach
it, feed it state, take its flows and metrics.

On start the agent looks in its store for a worker it started before: if that pid still runs the
worker, it is reused with its port (the BPF maps already point at it, and its connections live
on); otherwise the agent binds a new transparent listener, starts the worker in its own session
with the socket as an inherited fd, and records pid and port. An agent stop leaves the worker
running; `stop_worker(state_dir)` ends it for good.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from l7proxy.agent.flow_wire import FlowDecoder
from l7proxy.agent.node_proxy import node_listener

WORKER_MODULE = "l7proxy.agent.proxy_worker_process"
# A worker started by an agent from before the module's rename still runs under its old name; a
# new agent re-attaches to it all the same.
WORKER_MODULES = (WORKER_MODULE.encode(), b"l7proxy.agent.worker\0")


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(name in cmdline for name in WORKER_MODULES)


class WorkerHandle:
    def __init__(self, agent, pid: int, port: int, reused: bool) -> None:
        self.agent, self.pid, self.port, self.reused = agent, pid, port, reused
        self.host = "127.0.0.1"
        self.subscribers: list[asyncio.Queue] = []
        self.metrics_text = ""
        self.connected = 0
        self.seq = 0

    @classmethod
    async def attach(cls, agent) -> WorkerHandle:
        known = agent.store.get("proxy_worker") or {}
        pid, port = known.get("pid"), known.get("port")
        if pid and _alive(pid):
            return cls(agent, pid, port, reused=True)
        sock = node_listener()
        port = sock.getsockname()[1]
        log = open(agent.config.state_dir / "proxy-worker.log", "ab")  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", WORKER_MODULE, "--socket",
                 str(agent.config.socket), "--fd", str(sock.fileno()),
                 "--path-escaped-slashes", agent.config.path_escaped_slashes],
                pass_fds=(sock.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the agent and its signals
            )  # fmt: skip
        finally:
            log.close()
            sock.close()  # the worker holds it now
        agent.store.put("proxy_worker", {"pid": proc.pid, "port": port})
        return cls(agent, proc.pid, port, reused=False)

    # what the agent calls on any proxy

    def l7_ports(self, compiled) -> dict[int, int]:
        return {l7_id: self.port for l7_id in compiled.l7} if compiled is not None else {}

    def update(self, compiled, old) -> None:
        self.seq += 1
        state = {"state": self.state()}
        for queue in self.subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(state)

    def state(self) -> dict:
        agent = self.agent
        return {
            "seq": f"{os.getpid()}-{self.seq}",
            "revision": agent.store.revision(),
            "router": agent.pool.router,
            "router6": agent.pool6.router if agent.pool6 is not None else "",
            "identities": agent.allocator.to_state(),
            "endpoints": [ep.to_json() for ep in agent.store.endpoints()],
            # cluster mode: other nodes' pods (the worker resolves peers as the agent does) and
            # the cluster CIDR (an upstream to a pod there connects from the client's address)
            "remote": agent._cluster_ipcache_entries(),
            "cluster_cidr": agent.config.cluster_cidr if agent.config.kvstore else "",
            "cluster_cidr6": agent.config.cluster_cidr6 if agent.config.kvstore else "",
            "documents": [
                {
                    "key": d.key,
                    "name": d.name,
                    "namespace": d.namespace,
                    "source": d.source,
                    "text": d.text,
                    "revision": d.revision,
                }
                for d in agent.store.policies()
            ],
        }

    async def follow(self, args: dict):
        """The `proxy.state` stream: the current state now, then every new one."""
        queue: asyncio.Queue = asyncio.Queue(16)
        self.subscribers.append(queue)
        self.connected += 1
        try:
            yield {"state": self.state()}
            while True:
                yield await queue.get()
        finally:
            self.subscribers.remove(queue)
            self.connected -= 1

    def uplink(self, args: dict, item: dict) -> None:
        """The `proxy.flows` channel: flows into the agent's log, metrics text kept for /metrics.
        Flows come compact (`peers` and `shapes` lines, then `http` or `flows` lines,
        l7proxy/agent/flow_wire.py; those tables belong to the channel connection, so they live
        in that connection's `args`) or
        whole (`flow`, also what a worker from before the compact form sends)."""
        decoder = args.get("_flow_decoder")
        if not isinstance(decoder, FlowDecoder):
            decoder = None  # (until this connection's first peers: rows naming none are dropped)
        if "http" in item:
            if decoder is not None:
                ingest = self.agent.flows.ingest_pending
                for flow in decoder.http_run(item["http"]):
                    ingest(flow)
        elif "flows" in item:
            if decoder is not None:
                flows = self.agent.flows
                for row in item["flows"]:
                    if row and row[0] == "http":
                        flows.ingest_pending(decoder.http(row))
                    else:
                        flows.ingest(decoder.flow(row))
        elif "shapes" in item:
            if decoder is not None:
                decoder.shapes(item["shapes"])
        elif "peers" in item:
            if decoder is None:
                decoder = args["_flow_decoder"] = FlowDecoder()
            decoder.peers(item["peers"])
        elif "flow" in item:
            self.agent.flows.ingest(item["flow"])
        elif "metrics" in item:
            self.metrics_text = item["metrics"]

    def status(self) -> dict:
        alive = _alive(self.pid)
        how = "re-attached" if self.reused else "started"
        return {
            "state": "ok" if alive and self.connected else "down" if not alive else "connecting",
            "detail": f"worker pid {self.pid} ({how}) on 127.0.0.1:{self.port}",
        }

    async def close(self) -> None:
        pass  # the worker keeps proxying while the agent restarts


def stop_worker(state_dir: Path, timeout: float = 5.0) -> None:
    """End the worker recorded in a state directory (cleanup of a whole node)."""
    db = state_dir / "state.db"
    if not db.exists():
        return
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT value FROM kv WHERE key = 'proxy_worker'").fetchone()
    if not row:
        return
    pid = json.loads(row[0]).get("pid")
    if not pid or not _alive(pid):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
