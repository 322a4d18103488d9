"""The agent's node proxy: one shared transparent proxy for every endpoint on the node.

The tc programs hand a redirected connection to the listener on 127.0.0.1:PORT with
bpf_sk_assign, so the accepted socket's local address is the original destination. Per
connection the gate looks up both peers in the agent's tables, asks the compiled policy which L7
rule set applies (the destination's ingress, else the source's egress) and hands the connection
to the protocol session. The upstream connection carries the source identity in SO_MARK
(MARK_FROM_PROXY | identity), so the destination's ingress check sees the real source and the
proxy's own traffic is never redirected again.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass

from l7proxy.agent.connection_rules import connection_policy
from l7proxy.agent.loop import MarkedHost
from l7proxy.config import ProxyConfig
from l7proxy.context import OriginalDestination
from l7proxy.flows import FlowSink
from l7proxy.platform import MARK_FROM_PROXY, MARK_IDENTITY_MASK, transparent_listener
from l7proxy.protocols import worker_upstreams
from l7proxy.server import DeadlineSweeper, Gate, Listener
from l7proxy.session import drain_sessions

log = logging.getLogger("l7proxy.agent")


def marked_destination(
    ip: str, port: int, source_identity: int, source_ip: str = ""
) -> OriginalDestination:
    """The upstream address with the source identity's mark (MarkingLoop sets SO_MARK from it),
    and the client's address when the upstream must come from it (native cluster routing).
    The pool keys idle upstreams by destination; MarkedDestination keeps identities apart."""
    mark = MARK_FROM_PROXY | (source_identity & MARK_IDENTITY_MASK)
    return MarkedDestination(MarkedHost(ip, mark, source_ip), port, mark, source_ip)


@dataclass(frozen=True, slots=True)
class MarkedDestination(OriginalDestination):
    mark: int = 0
    source: str = ""


LISTEN_BACKLOG = 4096  # one shared listener for every endpoint on the node


def node_listener(port: int = 0, host: str = "127.0.0.1") -> socket.socket:
    """The node proxy's transparent listening socket (the tc programs assign connections to it);
    bound here for the inline proxy and by the agent for a proxy worker process."""
    return transparent_listener(port, host, backlog=LISTEN_BACKLOG)


class DirectSink(FlowSink):
    """The proxies' flow sink in the agent: every flow goes straight into the agent's flow log
    (no queue and no task switch per request; the log fans out to observers itself). An
    HTTP/1 flow stays unbuilt until it is read: the agent's log keeps it so
    (`FlowLog.ingest_pending`), a worker process's uplink sends its fields (flow_wire.py)."""

    def __init__(self, log) -> None:
        super().__init__(None)
        self._ingest = log.ingest
        self.emit_pending = log.ingest_pending  # (FlowLog's, or a worker's Uplink's)
        self._update_active()

    def _update_active(self) -> None:
        self.active = True  # the agent always records flows (observe, metrics, the map)

    def emit(self, flow: dict) -> None:
        self._ingest(flow)


class NodeGate(Gate):
    """A Gate whose listener view is built per connection from the original destination."""

    __slots__ = ("proxy",)

    def __init__(self, proxy: NodeProxy) -> None:
        super().__init__(proxy.base)
        self.proxy = proxy

    def connection_made(self, transport) -> None:
        local = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        self.lst = self.proxy.view(peer[0], local[0], local[1])
        super().connection_made(transport)


class NodeProxy:
    def __init__(
        self, agent, host: str = "127.0.0.1", port: int = 0, config: ProxyConfig | None = None
    ) -> None:
        self.agent = agent
        self.config = config or ProxyConfig()
        self.flows = DirectSink(agent.flows)
        self.metrics = agent.metrics.proxy
        self.sweeper = DeadlineSweeper(self.config.sweep_interval)
        self.pool = worker_upstreams(self.config)
        self.host, self.port = host, port
        self.server: asyncio.AbstractServer | None = None
        self.server6: asyncio.AbstractServer | None = None  # [::1]:port, for IPv6 flows
        self.base = self._listener(0, None, lambda: None, (0, ()), None)
        self.connections = 0

    async def start(self, sock: socket.socket | None = None) -> None:
        sock = sock or node_listener(self.port, self.host)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: NodeGate(self), sock=sock, backlog=LISTEN_BACKLOG
        )
        # IPv6 flows are assigned to [::1] on the same port. A host without IPv6 has none to
        # redirect: the datapath then finds no listener and drops (fail closed).
        try:
            sock6 = node_listener(self.port, "::1")
        except OSError as exc:
            log.warning("node proxy: no IPv6 listener on [::1]:%d (%s)", self.port, exc)
        else:
            sock6.setblocking(False)
            self.server6 = await loop.create_server(
                lambda: NodeGate(self), sock=sock6, backlog=LISTEN_BACKLOG
            )
        self.sweeper.start()

    def _listener(self, port, decision, rules, endpoint, dest) -> Listener:
        return Listener(
            port=port,
            protocol="auto",
            destination=lambda transport: dest,
            classify=lambda ip: decision,
            rules_for=lambda ip: rules,
            endpoint=lambda: endpoint,
            config=self.config,
            flows=self.flows,
            metrics=self.metrics,
            sweeper=self.sweeper,
            upstreams=self.pool,
        )

    def view(self, src_ip: str, dst_ip: str, dport: int) -> Listener:
        """The listener as this one connection sees it: its peers, its port, its rules."""
        self.connections += 1
        cp = connection_policy(self.agent, src_ip, dst_ip, dport)
        keeps = getattr(self.agent, "upstream_keeps_source", None)  # the agent or a worker's view
        source = src_ip if keeps is not None and keeps(src_ip, dst_ip) else ""
        dest = marked_destination(dst_ip, dport, cp.src_identity, source)
        lst = self._listener(dport, cp.decision, cp.rules, (cp.dst_identity, cp.dst_labels), dest)
        lst.direction = cp.direction
        return lst

    def l7_ports(self, compiled) -> dict[int, int]:
        return {l7_id: self.port for l7_id in compiled.l7} if compiled is not None else {}

    def update(self, compiled, old) -> None:
        pass  # rules() reads agent.compiled per request

    def status(self) -> dict:
        return {
            "state": "ok",
            "detail": f"node proxy on {self.host}:{self.port}, {self.connections} connections",
        }

    async def close(self, drain_time: float = 2.0) -> None:
        """Stop accepting, let requests in flight finish (briefly: an agent restart should be
        quick), then close what is left."""
        for server in (self.server, self.server6):
            if server is not None:
                server.close()
        await drain_sessions(self.sweeper.sessions, drain_time)
        self.sweeper.stop()
        self.pool.close()
        self.flows.close()
