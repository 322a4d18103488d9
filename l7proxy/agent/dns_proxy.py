"""The agent's DNS proxy (node mode): DNS selected by a `rules.dns` port rule is handed to it by the
tc programs (UDP: one transparent socket, the original destination from IP_RECVORIGDSTADDR;
TCP: a transparent listener on the same port number, whose accepted sockets' local address is
the original destination).

Per query: a name the endpoint's DNS rule set allows is forwarded to the server the pod asked
(from the node, with the pod's identity in SO_MARK); any other name gets REFUSED from the proxy;
a message that does not read as one query is dropped. Every outcome is a flow in Hubble's DNS
shape. An allowed answer's IPs are learned for toFQDNs *before* the answer goes back, so the
pod's first connect to them already finds them in the ipcache (agent.learn_fqdn)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import OrderedDict

import policies
from l7proxy import flows
from l7proxy.agent.dns_upstream import UdpUpstreams
from l7proxy.config import ProxyConfig
from l7proxy.platform import (
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
RCODE_NUMBERS = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "REFUSED": 5}
MAX_REPLY_SOCKETS = 256  # one per DNS server address the pods ask; oldest closed first
MAX_DATAGRAMS_PER_WAKEUP = 64


class DnsProxy:
    def __init__(self, agent, config: ProxyConfig | None = None) -> None:
        self.agent = agent
        self.config = config or ProxyConfig()
        self.port = 0
        self.udp: socket.socket | None = None
        self.tcp_server: asyncio.AbstractServer | None = None
        self.inflight = 0
        self._replies: OrderedDict[tuple[str, int], socket.socket] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()
        self.upstreams = UdpUpstreams()
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

    async def start(self) -> None:
        """UDP and TCP on one port number (the kernel policy entry carries one proxy port)."""
        for _ in range(50):
            udp = transparent_udp(0)
            port = udp.getsockname()[1]
            try:
                tcp = transparent_listener(port)
            except OSError:
                udp.close()
                continue
            break
        else:
            raise OSError("no port free for both UDP and TCP for the DNS proxy")
        self.udp, self.port = udp, port
        udp.setblocking(False)
        tcp.setblocking(False)
        loop = asyncio.get_running_loop()
        loop.add_reader(udp.fileno(), self._on_datagrams)
        self.tcp_server = await loop.create_server(lambda: _DnsOverTcp(self), sock=tcp)

    # UDP

    def _on_datagrams(self) -> None:
        for _ in range(MAX_DATAGRAMS_PER_WAKEUP):
            try:
                data, src, dst = recv_with_original_dst(self.udp, 65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("DNS proxy UDP receive: %s", exc)
                return
            if dst is None or self.inflight >= self.config.dns_max_inflight:
                self.requests.labels(verdict="DROPPED").inc()
                continue
            self._spawn(self._udp_query(data, src, dst))

    def _spawn(self, coro) -> None:
        self.inflight += 1
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.inflight -= 1
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("DNS query failed: %r", task.exception())

    async def _udp_query(self, data: bytes, src, dst) -> None:
        answer = await self.resolve(data, src, dst, "UDP")
        if answer is not None:
            with contextlib.suppress(OSError):
                self._reply_socket(dst).sendto(answer, src)

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
        started = time.monotonic_ns()
        src_id, src_labels, src_ep = self.agent.peer(src[0])
        dst_id, dst_labels, _ = self.agent.peer(dst[0])
        ends = Ends(src, dst, proto, src_id, src_labels, dst_id, dst_labels)
        try:
            query = parse_query(wire)
        except DnsError as exc:
            self.requests.labels(verdict="DROPPED").inc()
            self._flow(ends, "DROPPED", "REQUEST", None, str(exc), drop="MALFORMED_DNS")
            return None
        rules = self._rules(src_ep, dst_id, dst[1], proto)
        if rules is None or not rules.check(query.name).allowed:
            self.requests.labels(verdict="REFUSED").inc()
            self.refusals.inc()
            self._flow(ends, "DROPPED", "REQUEST", query, "", drop="POLICY_DENIED", rcode=5)
            return refused(query)
        self.requests.labels(verdict="FORWARDED").inc()
        self._flow(ends, "FORWARDED", "REQUEST", query, "")
        try:
            wire_answer = await self._forward(wire, dst, proto, src_id)
            answer = parse_answer(wire_answer)
        except (OSError, TimeoutError, DnsError) as exc:
            reason = f"no answer from {dst[0]}:{dst[1]}: {exc or type(exc).__name__}"
            self._flow(ends, "DROPPED", "RESPONSE", query, reason, drop="DNS_UPSTREAM")
            return None
        if answer.id != query.id:
            self._flow(
                ends, "DROPPED", "RESPONSE", query, "answer id mismatch", drop="DNS_UPSTREAM"
            )
            return None
        if answer.rcode == "NOERROR" and answer.ips and src_ep is not None:
            held = time.monotonic()
            if await self.agent.learn_fqdn(src_ep, answer.names, answer.ips):
                self.update_time.observe(time.monotonic() - held)
        self.responses.labels(rcode=answer.rcode).inc()
        latency = time.monotonic_ns() - started
        self._flow(ends, "FORWARDED", "RESPONSE", query, "", answer=answer, latency=latency)
        return wire_answer

    def _rules(self, src_ep, dst_id: int, dport: int, proto: str):
        compiled = self.agent.compiled
        if compiled is None or src_ep is None:
            return None
        v = policies.l4_verdict(compiled, src_ep, dst_id, policies.EGRESS, PROTO[proto], dport)
        rs = compiled.l7.get(v.l7_id) if v.action == "redirect" else None
        return rs if rs is not None and rs.parser == "dns" else None

    async def _forward(self, wire: bytes, dst, proto: str, src_id: int) -> bytes:
        timeout = self.config.dns_upstream_timeout
        if proto == "UDP":
            return await self.upstreams.ask(wire, dst, src_id, timeout)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            set_mark(sock, proxy_mark(src_id))  # the server's ingress sees the pod's identity
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
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

    def _flow(
        self, ends, verdict, kind, query, reason, *, drop=None, rcode=None, answer=None, latency=0
    ):
        dns = {"observation_source": "proxy"}
        if query is not None:
            dns.update(query=query.name, qtypes=[query.qtype])
        if answer is not None:
            dns.update(
                ips=[ip for ip, _ in answer.ips],
                ttl=min((ttl for _, ttl in answer.ips), default=0),
                cnames=list(answer.names[1:]),
                rcode=RCODE_NUMBERS.get(answer.rcode, 0),
                rrtypes=[answer.qtype] if answer.ips else [],
            )
        elif rcode is not None:
            dns["rcode"] = rcode
        name = query.name if query is not None else "?"
        qtype = query.qtype if query is not None else "?"
        if kind == "REQUEST":
            summary = f"DNS Query {name} {qtype}"
            if verdict == "DROPPED":
                summary += " (refused by policy)" if rcode == 5 else f" ({reason})"
        elif answer is not None:
            shown = ",".join(ip for ip, _ in answer.ips)
            summary = (
                f'DNS Answer "{shown}" TTL: {dns["ttl"]} (Proxy {name} {qtype}) {answer.rcode}'
            )
        else:
            summary = f"DNS Answer dropped ({reason})"
        flow = flows.build_flow(
            verdict=verdict,
            source=flows.endpoint(ends.src_id, ends.src_labels, ends.src[0]),
            destination=flows.endpoint(ends.dst_id, ends.dst_labels, ends.dst[0]),
            source_port=ends.src[1],
            destination_port=ends.dst[1],
            l7={"type": kind, "latency_ns": latency, "dns": dns},
            summary=summary,
            direction="EGRESS",
            drop_reason=drop,
        )
        flow["l4"] = {ends.proto: flow["l4"]["TCP"]}
        self.agent.flows.ingest(flow)

    def l7_ports(self, compiled) -> dict[int, int]:
        return {n: self.port for n, rs in compiled.l7.items() if rs.parser == "dns"}

    def status(self) -> dict:
        return {"state": "ok", "detail": f"DNS proxy on 127.0.0.1:{self.port} (UDP and TCP)"}

    async def close(self) -> None:
        if self.udp is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self.udp.fileno())
            self.udp.close()
        if self.tcp_server is not None:
            self.tcp_server.close()
        for task in list(self._tasks):
            task.cancel()
        self.upstreams.close()
        for sock in self._replies.values():
            sock.close()
        self._replies.clear()


class Ends:
    __slots__ = ("src", "dst", "proto", "src_id", "src_labels", "dst_id", "dst_labels")

    def __init__(self, src, dst, proto, src_id, src_labels, dst_id, dst_labels) -> None:
        self.src, self.dst, self.proto = src, dst, proto
        self.src_id, self.src_labels = src_id, src_labels
        self.dst_id, self.dst_labels = dst_id, dst_labels


class _DnsOverTcp(asyncio.Protocol):
    """One redirected DNS-over-TCP connection: messages in, answers out in the same order."""

    def __init__(self, proxy: DnsProxy) -> None:
        self.proxy = proxy
        self.deframer = TcpDeframer()
        self.transport = None
        self.queue: asyncio.Queue | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
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
