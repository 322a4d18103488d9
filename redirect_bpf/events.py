"""Verdict events from the ring buffer as Hubble-shaped flow dicts.

The reader polls on its own thread (never on the event loop) and hands each flow over through a
callback or a thread-safe queue. For asyncio: `dp.events(on_flow=asyncio_callback(loop, q))`.
"""

from __future__ import annotations

import ctypes as ct
import datetime as dt
import ipaddress
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable

from redirect_bpf import bpfsys, structs
from redirect_bpf.structs import FlowEvent, FlowEvent6

LabelsOf = Callable[[int], list[str]]


# Every new redirected or dropped flow passes through here, on the reader thread, which holds the
# GIL while it formats: the proxy's event loop waits meanwhile. inet_ntop formats an address in a
# fraction of a microsecond; an ipaddress object costs 1 us for IPv4 and 8 us for IPv6.
# A __be32 as ctypes reads it (a native int): packed back in native order, it is the wire bytes.
_NATIVE_U32 = struct.Struct("=I")
_V6_FALLBACK = bytes(10)  # ::/80 (IPv4-mapped and -compatible): glibc writes a dotted quad there


def _ip(addr_be: int) -> str:
    return socket.inet_ntoa(_NATIVE_U32.pack(addr_be))


def _ip6(addr) -> str:
    """The address as the agent writes it everywhere (str(ipaddress.IPv6Address)): inet_ntop
    gives the same RFC 5952 text except in ::/80, where ipaddress does it."""
    raw = bytes(addr)
    if raw[:10] == _V6_FALLBACK:
        return str(ipaddress.IPv6Address(raw))
    return socket.inet_ntop(socket.AF_INET6, raw)


_last_second: tuple[int, str] = (-1, "")  # the reader thread's events come in bursts per second


def _rfc3339(ts_ns: int) -> str:
    global _last_second
    secs, nanos = divmod(ts_ns, 1_000_000_000)
    cached_secs, base = _last_second
    if secs != cached_secs:
        base = dt.datetime.fromtimestamp(secs, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _last_second = (secs, base)  # one tuple swap: a second thread reads old or new, both whole
    return f"{base}.{nanos:09d}Z"


def to_flow(
    e: FlowEvent | FlowEvent6,
    *,
    node_name: str = "l7proxy",
    labels_of: LabelsOf | None = None,
) -> dict:
    """One kernel event as a flow dict (docs/contracts.md), with the matched policy key. An
    IPv6 record (FlowEvent6) carries its addresses after the IPv4 record's fields."""
    if isinstance(e, FlowEvent6):
        saddr, daddr = _ip6(e.saddr6), _ip6(e.daddr6)
        e = e.base
    else:
        saddr, daddr = (_ip(e.saddr) if e.saddr else ""), _ip(e.daddr)
    labels_of = labels_of or (lambda _identity: [])
    # Kernel time is CLOCK_MONOTONIC; shift it onto the wall clock.
    wall_ns = time.time_ns() - (time.monotonic_ns() - e.ts_ns)
    proto = structs.PROTO_NAMES.get(e.proto, str(e.proto))
    sport, dport = socket.ntohs(e.sport), socket.ntohs(e.dport)
    verdict = structs.VERDICT_NAMES.get(e.verdict, "ERROR")
    direction = structs.DIRECTION_NAMES.get(e.direction, "UNKNOWN")
    l4 = (
        {proto: {"type": dport}}
        if e.proto in (1, 58)
        else {proto: {"source_port": sport, "destination_port": dport}}
    )
    flow = {
        "time": _rfc3339(wall_ns),
        "verdict": verdict,
        "drop_reason_desc": structs.REASON_NAMES.get(e.reason, "") if e.verdict == 1 else "",
        "traffic_direction": direction,
        "source": {
            "identity": e.src_identity,
            "labels": labels_of(e.src_identity),
            "ip": saddr,
        },
        "destination": {
            "identity": e.dst_identity,
            "labels": labels_of(e.dst_identity),
            "ip": daddr,
        },
        "l4": l4,
        "Summary": f"{proto} {verdict.lower()} {direction.lower()}"
        + (f" ({structs.REASON_NAMES[e.reason]})" if e.verdict == 1 else ""),
        "node_name": node_name,
        "event_type": "L3_L4",
        "endpoint_id": e.endpoint_id,
        "reason": structs.REASON_NAMES.get(e.reason, str(e.reason)),
        "proxy_port": e.proxy_port,
        "policy_match": None,
    }
    if e.match != structs.MATCH_NONE:
        flow["policy_match"] = {
            "kind": structs.MATCH_NAMES[e.match],
            "identity": e.match_identity,
            "direction": e.direction,
            "proto": e.match_proto,
            "port": e.match_port,
            "prefix_len": e.match_prefix_len,
            "deny": bool(e.match_deny),
        }
    return flow


def asyncio_callback(loop, queue) -> Callable[[dict], None]:
    """An on_flow callback for EventReader that hands each flow to an asyncio.Queue owned by
    `loop`, safely from the reader thread (drops the flow if the queue is full)."""

    def put(flow: dict) -> None:
        def deliver() -> None:
            if not queue.full():
                queue.put_nowait(flow)

        loop.call_soon_threadsafe(deliver)

    return put


class EventReader:
    """Reads the ring buffer on a daemon thread until stop()."""

    def __init__(
        self,
        ringbuf_fd: int,
        on_flow: Callable[[dict], None] | None = None,
        *,
        node_name: str = "l7proxy",
        labels_of: LabelsOf | None = None,
        poll_ms: int = 100,
    ):
        self.queue: queue.Queue[dict] = queue.Queue(maxsize=100_000)
        self.dropped = 0  # flows the queue had no room for
        self._on_flow = on_flow or self._enqueue
        self._node_name = node_name
        self._labels_of = labels_of
        self._poll_ms = poll_ms
        self._stop = threading.Event()
        self._cb = bpfsys.SAMPLE_FN(self._sample)  # keep a reference: C holds only the pointer
        self._rb = bpfsys.lib().ring_buffer__new(ringbuf_fd, self._cb, None, None)
        if not self._rb:
            raise OSError(ct.get_errno(), "ring_buffer__new failed")
        self._thread = threading.Thread(target=self._run, name="bpf-events", daemon=True)

    def _enqueue(self, flow: dict) -> None:
        try:
            self.queue.put_nowait(flow)
        except queue.Full:
            self.dropped += 1

    def _sample(self, _ctx, data, size) -> int:
        if size >= ct.sizeof(FlowEvent):
            record = FlowEvent6 if size >= ct.sizeof(FlowEvent6) else FlowEvent
            event = record.from_buffer_copy(ct.string_at(data, ct.sizeof(record)))
            try:
                self._on_flow(to_flow(event, node_name=self._node_name, labels_of=self._labels_of))
            except Exception:  # a consumer bug must not kill the reader
                self.dropped += 1
        return 0

    def _run(self) -> None:
        lib = bpfsys.lib()
        while not self._stop.is_set():
            lib.ring_buffer__poll(self._rb, self._poll_ms)

    def start(self) -> EventReader:
        self._thread.start()
        return self

    def get(self, timeout: float = 1.0) -> dict | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(2)
        if self._rb:
            bpfsys.lib().ring_buffer__free(self._rb)
            self._rb = None
