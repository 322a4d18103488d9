"""The agent's DNS proxy (node mode): DNS selected by a `rules.dns` port rule is handed to it by the
tc programs (UDP: one transparent socket, the original destination from IP_RECVORIGDSTADDR;
TCP: a transparent listener on the same port number, whose accepted sockets' local address is
the original destination).

Per query: a name the endpoint's DNS rule set allows is forwarded to the server the pod asked
(from the node, with the pod's identity in SO_MARK); any other name gets REFUSED from the proxy;
a message that does not read as one query is dropped. Every outcome is a flow in Hubble's DNS
shape. An allowed answer's IPs are learned for toFQDNs *before* the answer goes back, so the
pod's first connect to them already finds them in the ipcache (agent.fqdn_hold).

A UDP query is handled without a task: judged in the socket's read callback, forwarded with a
callback (dns_upstream.py), answered from that callback; only an answer that must wait for a
datapath update waits on a future. Peers and the verdict of (endpoint, server, port) are cached
per compiled policy and ipcache. Flows are built after the answer went out. Issue 21's profile:
a task, a coroutine, a future and a timer per query, an IP parse per answer IP, and the flows
before the reply were most of the ~0.4 ms of CPU a query cost."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import threading
import time
from collections import OrderedDict

import policies
from l7proxy.agent.dns_flows import Ends, dns_flow
from l7proxy.agent.dns_upstream import UdpUpstreams
from l7proxy.config import ProxyConfig
from l7proxy.platform import (
    family_of,
    proxy_mark,
    recv_with_original_dst,
    reply_socket,
    set_mark,
    transparent_listener,
    transparent_udp,
)
from parsers.dns import DnsError, TcpDeframer, frame, parse_answer, parse_query, refused

log = logging.getLogger("l7proxy.dns")
PROTO = {"UDP": policies.PROTO_UDP, "TCP": policies.PROTO_TCP}
MAX_REPLY_SOCKETS = 256  # one per DNS server address the pods ask; oldest closed first
MAX_DATAGRAMS_PER_WAKEUP = 64
MAX_CACHED = 4096  # peers / verdicts remembered per compiled policy
FLOW_BATCH_DELAY = 0.005  # seconds: noted flows wait at least this long for company...
FLOW_MAX_DELAY = 0.010  # ...and at most this long for a moment with no answer outstanding


class DnsProxy:
    def __init__(self, agent, config: ProxyConfig | None = None) -> None:
        self.agent = agent
        self.config = config or ProxyConfig()
        self.port = 0
        self.udp: socket.socket | None = None  # IPv4; udp_sockets: with the IPv6 one
        self.udp_sockets: list[socket.socket] = []
        self.tcp_servers: list[asyncio.AbstractServer] = []
        self.inflight = 0
        self._replies: OrderedDict[tuple[str, int], socket.socket] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self.upstreams = UdpUpstreams(self.config.dns_upstream_timeout)
        self._cache_key: tuple = (None, None)  # (compiled, ipcache) the caches below hold for
        self._peers: dict[str, tuple] = {}
        self._verdicts: dict[tuple, object] = {}
        # (time_ns, ends, args, kw) of flows to build, handed to the flow log together
        self._flows: list[tuple] = []
        self._flows_timer: asyncio.TimerHandle | None = None
        self._flows_soon: asyncio.Handle | None = None
        self._flows_due = False  # FLOW_BATCH_DELAY passed: flush once nothing waits
        r = agent.metrics.registry
        self.requests = r.counter(
            "dns_requests_total", "DNS queries seen by the DNS proxy, by verdict", ("verdict",)
        )
        self.responses = r.counter(
            "dns_responses_total", "DNS answers relayed to endpoints, by rcode", ("rcode",)
        )
        self.refusals = r.counter("dns_refused_total", "DNS queries answered REFUSED by policy")
        self.update_time = r.histogram(
            "fqdn_datapath_update_seconds",
            "Time an answer with new IPs was held until they were in the datapath",
        )
        # the counters' children, looked up once rather than per query
        self._verdict_count = {
            v: self.requests.labels(verdict=v) for v in ("FORWARDED", "REFUSED", "DROPPED")
        }
        self._rcode_count: dict[str, object] = {}

    async def start(self) -> None:
        """UDP and TCP on one port number (the kernel policy entry carries one proxy port), on
        127.0.0.1 and on [::1] (the tc program hands IPv6 DNS to the latter). Without IPv6 on
        the host only IPv4: IPv6 DNS to a dns rule's port then finds no proxy socket and is
        dropped (fail closed)."""
        for _ in range(50):
            udp = transparent_udp(0)
            port = udp.getsockname()[1]
            socks = [udp]
            try:
                socks.append(transparent_listener(port))
                socks += self._ipv6_sockets(port)
            except OSError:
                for sock in socks:
                    sock.close()
                continue
            break
        else:
            raise OSError("no port free for both UDP and TCP for the DNS proxy")
        self.udp, self.port = udp, port
        self.udp_sockets = [sock for sock in socks if sock.type == socket.SOCK_DGRAM]
        self._raise_priority()
        loop = asyncio.get_running_loop()
        for sock in socks:
            sock.setblocking(False)
            if sock.type == socket.SOCK_DGRAM:
                loop.add_reader(sock.fileno(), self._on_datagrams, sock)
            else:
                server = await loop.create_server(lambda: _DnsOverTcp(self), sock=sock)
                self.tcp_servers.append(server)

    def _ipv6_sockets(self, port: int) -> list[socket.socket]:
        """UDP and TCP on [::1]:port; [] when the host has no IPv6 loopback (OSError: the port
        is taken, try another)."""
        try:
            udp6 = transparent_udp(port, "::1")
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                log.warning("DNS proxy: no IPv6 socket (%s); IPv6 DNS is dropped", exc)
                return []
            raise
        try:
            return [udp6, transparent_listener(port, "::1")]
        except OSError:
            udp6.close()
            raise

    def _raise_priority(self) -> None:
        """A proxied query needs this thread on a CPU twice (the query, the answer); on a busy
        node the wait for a CPU, not the work, is the proxy's p99. Only this thread (and
        threads it starts later) get the nice value."""
        if not self.config.dns_nice:
            return
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.dns_nice)
        except OSError as exc:
            log.warning("DNS proxy: cannot set nice %d (%s); answers may wait for a CPU",
                        self.config.dns_nice, exc)  # fmt: skip

    # UDP

    def _on_datagrams(self, sock: socket.socket) -> None:
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data, src, dst = recv_with_original_dst(sock, 65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("DNS proxy UDP receive: %s", exc)
                return
            if dst is None or self.inflight >= self.config.dns_max_inflight:
                self._verdict_count["DROPPED"].inc()
                continue
            try:
                self.handle(data, src, dst, "UDP", None)
            except Exception:  # noqa: BLE001 - one query must never stop the proxy
                log.exception("DNS query from %s failed", src)

    def _send(self, reply, ends: Ends, answer: bytes | None) -> None:
        """Give the client its answer: `reply(answer)`, or for UDP (reply None) a datagram from
        the server's address (nothing when the query is dropped)."""
        if reply is not None:
            reply(answer)
        elif answer is not None:
            with contextlib.suppress(OSError):
                self._reply_socket(ends.dst).sendto(answer, ends.src)

    def _reply_socket(self, source: tuple[str, int]) -> socket.socket:
        sock = self._replies.get(source)
        if sock is None:
            sock = self._replies[source] = reply_socket(source)
            if len(self._replies) > MAX_REPLY_SOCKETS:
                self._replies.popitem(last=False)[1].close()
        else:
            self._replies.move_to_end(source)
        return sock

    # one query, either transport

    async def resolve(self, wire: bytes, src, dst, proto: str) -> bytes | None:
        """The bytes to send back to the client, or None (dropped)."""
        future = asyncio.get_running_loop().create_future()
        self.handle(wire, src, dst, proto, lambda a: future.done() or future.set_result(a))
        return await future

    def handle(self, wire: bytes, src, dst, proto: str, reply) -> None:
        """Judge one query; `reply(bytes)` (the answer or REFUSED) or `reply(None)` (dropped)
        is called exactly once, now or later; `reply` None: answer over UDP from `dst`."""
        started = time.monotonic_ns()
        ends = Ends(src, dst, proto, self._peer(src[0]), self._peer(dst[0]))
        try:
            query = parse_query(wire)
        except DnsError as exc:
            self._verdict_count["DROPPED"].inc()
            self._send(reply, ends, None)
            self._flow(ends, "DROPPED", "REQUEST", None, str(exc), drop="MALFORMED_DNS")
            return
        rules = self._rules(ends.src_ep, ends.dst_id, dst[1], proto)
        if rules is None or not rules.check(query.name).allowed:
            self._verdict_count["REFUSED"].inc()
            self.refusals.inc()
            self._send(reply, ends, refused(query))
            self._flow(ends, "DROPPED", "REQUEST", query, "", drop="POLICY_DENIED", rcode=5)
            return
        self._verdict_count["FORWARDED"].inc()
        job = _Job(self, ends, query, reply, started)
        self.inflight += 1
        if proto == "UDP":
            try:
                self.upstreams.send(wire, dst, ends.src_id, job.answered)
            except Exception as exc:  # noqa: BLE001 - answered after the REQUEST flow below
                asyncio.get_running_loop().call_soon(self._answered, job, None, exc)
        else:
            self._spawn(self._tcp_forward(job, wire))
        self._flow(ends, "FORWARDED", "REQUEST", query, "")

    def _answered(self, job: _Job, wire: bytes | None, error: Exception | None) -> None:
        """The server's answer (or why there is none): learn its IPs, then release it."""
        ends, query = job.ends, job.query
        answer = None
        if error is None:
            try:
                answer = parse_answer(wire)
            except DnsError as exc:
                error = exc
            else:
                if answer.id != query.id:
                    error = DnsError("answer id mismatch")
        if error is not None:
            dst = ends.dst
            reason = f"no answer from {dst[0]}:{dst[1]}: {str(error) or type(error).__name__}"
            self._finish(job, None)
            self._flow(ends, "DROPPED", "RESPONSE", query, reason, drop="DNS_UPSTREAM")
            return
        hold = None
        if answer.rcode == "NOERROR" and answer.ips and ends.src_ep is not None:
            try:
                hold = self.agent.fqdn_hold(ends.src_ep, answer.names, answer.ips)
            except Exception as exc:  # noqa: BLE001 - an answer that was not learned is dropped
                return self._not_learned(job, exc)
        if hold is None:
            self._release(job, wire, answer)
            return
        held = time.monotonic()

        def updated(update: asyncio.Future) -> None:
            if update.cancelled() or update.exception() is not None:
                self._not_learned(job, update.exception() if not update.cancelled() else None)
                return
            self.update_time.observe(time.monotonic() - held)
            self._peers.clear()  # the ipcache changed under the cache's key
            self._release(job, wire, answer)

        hold.add_done_callback(updated)

    def _release(self, job: _Job, wire: bytes, answer) -> None:
        self._finish(job, wire)
        counter = self._rcode_count.get(answer.rcode)
        if counter is None:
            counter = self._rcode_count[answer.rcode] = self.responses.labels(rcode=answer.rcode)
        counter.inc()
        latency = time.monotonic_ns() - job.started
        self._flow(job.ends, "FORWARDED", "RESPONSE", job.query, "", answer=answer, latency=latency)

    def _not_learned(self, job: _Job, exc) -> None:
        log.error("DNS answer for %s not learned: %r", job.query.name, exc)
        self._finish(job, None)
        reason = "its IPs could not be put into the datapath"
        self._flow(job.ends, "DROPPED", "RESPONSE", job.query, reason, drop="FQDN_UPDATE")

    def _finish(self, job: _Job, wire: bytes | None) -> None:
        self.inflight -= 1
        self._send(job.reply, job.ends, wire)

    def _peer(self, ip: str) -> tuple:
        """agent.peer(ip), remembered until the policy or the ipcache object changes."""
        agent = self.agent
        key = self._cache_key
        if key[0] is not agent.compiled or key[1] is not agent.ipcache:
            self._cache_key = (agent.compiled, agent.ipcache)
            self._peers.clear()
            self._verdicts.clear()
        found = self._peers.get(ip)
        if found is None:
            found = agent.peer(ip)
            if len(self._peers) < MAX_CACHED:
                self._peers[ip] = found
        return found

    def _rules(self, src_ep, dst_id: int, dport: int, proto: str):
        """The DNS rule set for this (endpoint, server, port, protocol), or None: no DNS rule
        redirects it. Called after _peer, which cleared the cache if the policy changed."""
        key = (src_ep, dst_id, dport, proto)
        if key in self._verdicts:
            return self._verdicts[key]
        compiled = self.agent.compiled
        rs = None
        if compiled is not None and src_ep is not None:
            v = policies.l4_verdict(compiled, src_ep, dst_id, policies.EGRESS, PROTO[proto], dport)
            rs = compiled.l7.get(v.l7_id) if v.action == "redirect" else None
            rs = rs if rs is not None and rs.parser == "dns" else None
        if len(self._verdicts) < MAX_CACHED:
            self._verdicts[key] = rs
        return rs

    # DNS over TCP upstream: one connection per query

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _tcp_forward(self, job: _Job, wire: bytes) -> None:
        try:
            answer = await self._forward_tcp(wire, job.ends.dst, job.ends.src_id)
        except (OSError, TimeoutError, DnsError) as exc:
            self._answered(job, None, exc)
        except asyncio.CancelledError:
            self._finish(job, None)
            raise
        else:
            self._answered(job, answer, None)

    async def _forward_tcp(self, wire: bytes, dst, src_id: int) -> bytes:
        loop = asyncio.get_running_loop()
        sock = socket.socket(family_of(dst[0]), socket.SOCK_STREAM)
        try:
            set_mark(sock, proxy_mark(src_id))  # the server's ingress sees the pod's identity
            sock.setblocking(False)
            async with asyncio.timeout(self.config.dns_upstream_timeout):
                await loop.sock_connect(sock, dst)
                await loop.sock_sendall(sock, frame(wire))
                deframer = TcpDeframer()
                while True:
                    chunk = await loop.sock_recv(sock, 65535)
                    if not chunk:
                        raise DnsError("the server closed the TCP connection")
                    messages = deframer.feed(chunk)
                    if messages:
                        return messages[0]
        finally:
            sock.close()

    # flows: off the query's path

    def _flow(self, ends: Ends, *args, **kw) -> None:
        """Note a flow, stamped with the time it happened. Noted flows are built and handed to
        the flow log (observe, metrics, the live map) together: FLOW_BATCH_DELAY after the
        first, at the next moment no forwarded query waits for its answer (right after an
        answer or a REFUSED went out), or at FLOW_MAX_DELAY when queries never stop. So an
        answer on its way never waits behind flows, and the log's readers wake once per batch
        rather than once per flow."""
        self._flows.append((time.time_ns(), ends, args, kw))
        if self._flows_timer is None:
            loop = asyncio.get_running_loop()
            self._flows_timer = loop.call_later(FLOW_BATCH_DELAY, self._flows_wait_idle)
        elif self._flows_due and self.inflight == 0 and self._flows_soon is None:
            self._flows_soon = asyncio.get_running_loop().call_soon(self.flush_flows)

    def _flows_wait_idle(self) -> None:
        self._flows_due = True
        delay = FLOW_MAX_DELAY - FLOW_BATCH_DELAY
        self._flows_timer = asyncio.get_running_loop().call_later(delay, self.flush_flows)

    def flush_flows(self) -> None:
        """Every noted flow into the flow log now."""
        for handle in (self._flows_timer, self._flows_soon):
            if handle is not None:
                handle.cancel()
        self._flows_timer = self._flows_soon = None
        self._flows_due = False
        noted, self._flows = self._flows, []
        if noted:
            self.agent.flows.ingest_many(
                [dns_flow(ends, *args, time_ns=at, **kw) for at, ends, args, kw in noted]
            )

    # sidecar mode: DNS over TCP that the connect4 hook sent to the endpoint's sidecar listener

    def takes_tcp(self, endpoint_ip: str, dst: tuple[str, int]) -> bool:
        """True when a dns rule redirects TCP from this endpoint to dst (the sidecar hands such
        a connection over instead of proxying it as HTTP)."""
        src_ep = self._peer(endpoint_ip)[2]
        return self._rules(src_ep, self._peer(dst[0])[0], dst[1], "TCP") is not None

    def adopt_tcp(self, transport, src: tuple[str, int], dst: tuple[str, int]) -> None:
        """Serve an accepted connection from `src` to the original destination `dst`."""
        protocol = _DnsOverTcp(self, src, dst)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)

    def l7_ports(self, compiled) -> dict[int, int]:
        return {n: self.port for n, rs in compiled.l7.items() if rs.parser == "dns"}

    def status(self) -> dict:
        where = f"127.0.0.1:{self.port}"
        if len(self.udp_sockets) > 1:
            where += f" and [::1]:{self.port}"
        return {"state": "ok", "detail": f"DNS proxy on {where} (UDP and TCP)"}

    async def close(self) -> None:
        self.flush_flows()
        for sock in self.udp_sockets:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(sock.fileno())
            sock.close()
        for server in self.tcp_servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        self.upstreams.close()
        for sock in self._replies.values():
            sock.close()
        self._replies.clear()


class _Job:
    """A forwarded query waiting for its answer."""

    __slots__ = ("proxy", "ends", "query", "reply", "started")

    def __init__(self, proxy: DnsProxy, ends: Ends, query, reply, started: int) -> None:
        self.proxy, self.ends, self.query, self.reply, self.started = (
            proxy, ends, query, reply, started
        )  # fmt: skip

    def answered(self, wire: bytes | None, error: Exception | None) -> None:
        self.proxy._answered(self, wire, error)


class _DnsOverTcp(asyncio.Protocol):
    """One redirected DNS-over-TCP connection: messages in, answers out in the same order."""

    def __init__(self, proxy: DnsProxy, peer=None, local=None) -> None:
        self.proxy = proxy
        self.deframer = TcpDeframer()
        self.transport = None
        self.queue: asyncio.Queue | None = None
        self.peer, self.local = peer, local  # given when a sidecar listener accepted it

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.peer is None:  # redirected by tc to the transparent listener
            self.peer = transport.get_extra_info("peername")[:2]
            self.local = transport.get_extra_info("sockname")[:2]  # the original destination
        self.queue = asyncio.Queue()
        self.task = asyncio.ensure_future(self._serve())

    def data_received(self, data: bytes) -> None:
        try:
            messages = self.deframer.feed(data)
        except DnsError:
            self.transport.close()
            return
        for m in messages:
            self.queue.put_nowait(m)

    async def _serve(self) -> None:
        while True:
            message = await self.queue.get()
            answer = await self.proxy.resolve(message, self.peer, self.local, "TCP")
            if answer is None:
                self.transport.close()
                return
            self.transport.write(frame(answer))

    def connection_lost(self, exc) -> None:
        self.task.cancel()
