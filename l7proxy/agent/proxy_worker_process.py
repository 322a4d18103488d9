"""The proxy worker process: the node proxy in its own process, so an agent restart does not cut
L7 connections.

`l7proxy agent --proxy-worker process` starts this once and leaves it running across its own
restarts (the pid and port are in the agent's store). The agent hands over the listening socket
(IP_TRANSPARENT, on the port the BPF maps redirect to) as an inherited fd. The worker follows the
agent's `proxy.state` stream (policy documents, endpoints, identities: it compiles the same
CompiledPolicy locally with the same allocator state) and sends its flows and metrics back on a
`proxy.flows` channel. While no agent runs, the worker keeps proxying with the last state it
has, and reconnects every half second.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections import deque
from types import SimpleNamespace

import policies
from l7proxy.agent import policy_repo, ports
from l7proxy.agent.flow_wire import FlowEncoder
from l7proxy.agent.loop import new_event_loop
from l7proxy.agent.node_proxy import NodeProxy
from l7proxy.agent.store import PolicyDoc
from l7proxy.cluster.ipam import in_cluster
from l7proxy.config import ProxyConfig
from l7proxy.flows import HttpFlow
from l7proxy.metrics import ProxyMetrics
from parsers.http_path import ESCAPED_SLASH_MODES, UNESCAPE

RECONNECT = 0.5
METRICS_EVERY = 1.0
BACKLOG = 10_000  # flows kept while the agent is away
# Compact flows per `flows` line (about 100-300 bytes each): far below the agent's line limit.
FLOWS_PER_LINE = 256
FLOW_BATCH_DELAY = 0.01


def _line(item: dict) -> bytes:
    return json.dumps(item, separators=(",", ":")).encode() + b"\n"


class Uplink:
    """Flows and metrics for the agent; buffered (bounded) while it is away.

    Sent items stay in `inflight` until the agent acknowledges them (`{"ack": N}`: N lines of
    this connection handled). When the connection ends, the flows not acknowledged go back in
    front of `pending` for the next agent: a batch written into the socket of an agent that is
    stopping is otherwise lost without an error."""

    def __init__(self) -> None:
        self.pending: deque[dict] = deque(maxlen=BACKLOG)
        self.inflight: deque[tuple[int, dict]] = deque(maxlen=BACKLOG)
        self.sent = 0  # lines written on the current connection
        self.wake = asyncio.Event()

    def ingest(self, flow: dict) -> None:
        self.pending.append({"flow": flow})
        self.wake.set()

    # An HTTP/1 flow not built (HttpFlow) queues the same way; encode() sends it as its shape
    # and four numbers (flow_wire.py)
    ingest_pending = ingest

    def take(self) -> list[dict]:
        batch, self.pending = list(self.pending), deque(maxlen=BACKLOG)
        return batch

    def sending(self, items: list[dict]) -> None:
        """One line goes out carrying `items` (none for a peers or metrics line)."""
        self.sent += 1
        for item in items:
            self.inflight.append((self.sent, item))

    def encode(self, items: list[dict], encoder: FlowEncoder) -> bytes:
        """The lines for `items`, in their order: a run of HTTP/1 flows not built goes as one
        `http` line (after the `shapes` line of its new shapes), a run of other proxy flows as
        one `flows` line, each with the `peers` lines they need first; any other item as its
        own line (flow_wire.py)."""
        out: list[bytes] = []
        run: list[list] = []  # rows of a `flows` line
        http: list[int] = []  # the flat `http` line: t0, then 4 numbers a flow
        shapes: list[list] = []  # new shapes the `http` line uses
        carried: list[dict] = []

        def end_run() -> None:
            if shapes:
                self.sending([])
                out.append(_line({"shapes": shapes[:]}))
                shapes.clear()
            if run or http:
                self.sending(carried[:])
                out.append(_line({"flows": run[:]} if run else {"http": http[:]}))
                run.clear()
                http.clear()
                carried.clear()

        for item in items:
            flow = item.get("flow")
            if type(flow) is HttpFlow:
                if run:
                    end_run()
                peers, shape, sid = encoder.http_shape(flow)
                if peers is not None:  # a line before the run's line, which names it
                    self.sending([])
                    out.append(_line(peers))
                if shape is not None:
                    shapes.append(shape)
                if not http:
                    http.append(flow.time_ns)
                http += (sid, flow.time_ns - http[0], flow.sport, flow.latency)
                carried.append(item)
                if len(carried) >= FLOWS_PER_LINE:
                    end_run()
                continue
            peers, row = (None, None) if flow is None else encoder.row(flow)
            if row is None or http:
                end_run()
            if row is None:
                self.sending([item] if flow is not None else [])
                out.append(_line(item))
                continue
            if peers is not None:
                self.sending([])
                out.append(_line(peers))
            run.append(row)
            carried.append(item)
            if len(run) >= FLOWS_PER_LINE:
                end_run()
        end_run()
        return b"".join(out)

    def acked(self, n: int) -> None:
        while self.inflight and self.inflight[0][0] <= n:
            self.inflight.popleft()

    def disconnected(self) -> None:
        """The connection ended: flows it did not acknowledge are sent again (metrics are not,
        the next snapshot replaces them)."""
        unacked = [item for _, item in self.inflight if "flow" in item]
        self.inflight.clear()
        self.sent = 0
        self.put_back(unacked)

    def put_back(self, batch: list[dict]) -> None:
        newer, self.pending = self.pending, deque(batch, maxlen=BACKLOG)
        self.pending.extend(newer)


class WorkerView:
    """The part of an Agent the proxies use, fed from the agent's state stream."""

    def __init__(self, mode: str) -> None:
        self.config = SimpleNamespace(mode=mode)
        self.compiled = None
        self.seq = -1  # the agent's install counter of the state in force
        self.flows = Uplink()
        self.metrics = SimpleNamespace(proxy=ProxyMetrics())
        self._by_ip: dict[str, dict] = {}
        self.allocator = policies.IdentityAllocator(None)
        self.ipcache = policies.IPCache()
        self.cluster_cidr = ""
        self.cluster_cidr6 = ""

    def apply(self, state: dict) -> None:
        allocator = policies.IdentityAllocator(state["identities"])
        ipcache = policies.IPCache()
        for cidr, identity in state.get("remote", {}).items():  # other nodes' pods
            ipcache.upsert(cidr, identity)
        ipcache.upsert(f"{state['router']}/32", policies.HOST)
        if state.get("router6"):  # a dual-stack agent (--pool6)
            ipcache.upsert(f"{state['router6']}/128", policies.HOST)
        by_ip = {}
        endpoints = {}
        for ep in state["endpoints"]:
            for ip, plen in ((ep["ip"], 32), (ep.get("ip6", ""), 128)):
                if ip:  # an IPv6-only endpoint has no IPv4 address, a v4 one no IPv6
                    by_ip[ip] = ep
                    ipcache.upsert(f"{ip}/{plen}", ep["identity"])
            endpoints[ep["name"]] = policies.parse_labels(",".join(ep["labels"]))
        docs = [PolicyDoc(**d) for d in state["documents"]]
        rules = policy_repo.load_rules(docs)
        # the same named-port table as the agent's compile (an older agent sends no "ports")
        named = ports.table(
            (ep["name"], ports.from_json(ep.get("ports"))) for ep in state["endpoints"]
        )
        compiled = policies.compile_policy(
            rules, endpoints, allocator, ipcache, state["revision"], named_ports=named
        )
        self.allocator, self.ipcache, self._by_ip = allocator, ipcache, by_ip
        self.cluster_cidr = state.get("cluster_cidr", "")
        self.cluster_cidr6 = state.get("cluster_cidr6", "")
        self.compiled, self.seq = compiled, state["seq"]

    def upstream_keeps_source(self, src_ip: str, dst_ip: str) -> bool:
        """The agent's rule (Agent.upstream_keeps_source): an upstream from a local pod to
        another node's pod connects from the pod's own address."""
        if not self.cluster_cidr or src_ip not in self._by_ip or dst_ip in self._by_ip:
            return False
        return in_cluster(dst_ip, self.cluster_cidr, self.cluster_cidr6)

    def peer(self, ip: str) -> tuple[int, list[str], str | None]:
        ep = self._by_ip.get(ip)
        if ep is not None:
            return ep["identity"], list(ep["labels"]), ep["name"]
        identity = self.ipcache.lookup(ip)
        labels = self.allocator.labels_of(identity)
        return identity, [str(lb) for lb in labels] if labels is not None else [], None


async def _open(path: str, op: str):
    reader, writer = await asyncio.open_unix_connection(path, limit=64 * 1024 * 1024)
    writer.write(json.dumps({"op": op, "args": {"pid": os.getpid()}}).encode() + b"\n")
    await writer.drain()
    return reader, writer


async def follow_state(view: WorkerView, path: str) -> None:
    while True:
        try:
            reader, writer = await _open(path, "proxy.state")
            try:
                while line := await reader.readline():
                    msg = json.loads(line)
                    if "state" in msg and msg["state"]["seq"] != view.seq:
                        await asyncio.to_thread(view.apply, msg["state"])
            finally:
                writer.close()
        except (OSError, ValueError, policy_repo.ApiError) as exc:
            print(f"l7proxy worker: state stream: {exc}", file=sys.stderr, flush=True)
        await asyncio.sleep(RECONNECT)


async def _read_acks(reader: asyncio.StreamReader, uplink: Uplink) -> None:
    """The agent's acknowledgements; returns at EOF (the agent stopped)."""
    while line := await reader.readline():
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            uplink.acked(int(json.loads(line)["ack"]))


async def send_uplink(view: WorkerView, path: str) -> None:
    uplink = view.flows
    while True:
        gone = None
        try:
            reader, writer = await _open(path, "proxy.flows")
            encoder = FlowEncoder()  # the agent's side of this connection knows no peers yet
            # EOF on the acknowledgement stream means the agent stopped: watching for it lets
            # the worker switch to the next agent without waiting for a write to fail.
            gone = asyncio.ensure_future(_read_acks(reader, uplink))
            try:
                last_metrics = 0.0
                loop = asyncio.get_running_loop()
                while not gone.done():
                    batch = uplink.take()
                    if loop.time() - last_metrics >= METRICS_EVERY:
                        batch.append({"metrics": view.metrics.proxy.render()})
                        last_metrics = loop.time()
                    if batch:
                        writer.write(uplink.encode(batch, encoder))
                    await writer.drain()
                    if writer.is_closing() or gone.done():
                        raise ConnectionResetError("the agent went away")
                    uplink.wake.clear()
                    if not uplink.pending:
                        woken = asyncio.ensure_future(uplink.wake.wait())
                        await asyncio.wait(
                            {woken, gone},
                            timeout=METRICS_EVERY,
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                        woken.cancel()
                    # Under load a flow comes at every loop turn: gathered for a few ms, they
                    # cost the agent one wake-up and one acknowledgement per write, not per turn.
                    await asyncio.sleep(FLOW_BATCH_DELAY)
            finally:
                writer.close()
        except OSError:
            pass
        finally:
            if gone is not None:
                gone.cancel()
            uplink.disconnected()  # what this agent did not acknowledge goes to the next one
        await asyncio.sleep(RECONNECT)


async def run(args) -> int:
    view = WorkerView(args.mode)
    sock = socket.socket(fileno=args.fd)
    proxy = NodeProxy(view, config=ProxyConfig(path_escaped_slashes=args.path_escaped_slashes))
    await proxy.start(sock=sock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        loop.create_task(follow_state(view, args.socket)),
        loop.create_task(send_uplink(view, args.socket)),
    ]
    print(f"l7proxy worker {os.getpid()}: proxying on port {proxy.port}", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await proxy.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m l7proxy.agent.proxy_worker_process")
    p.add_argument("--socket", required=True, help="the agent's API socket")
    p.add_argument("--fd", type=int, required=True, help="inherited listening socket")
    p.add_argument("--mode", default="node")
    p.add_argument("--path-escaped-slashes", choices=ESCAPED_SLASH_MODES, default=UNESCAPE)
    args = p.parse_args(argv)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
