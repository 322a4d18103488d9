"""Reset the sockets that the socket LB connected to a backend that is gone.

The socket LB connects a client's socket straight to the backend at connect() time, so when a
backend is deleted nothing on the path notices: its namespace and veth are gone, and the
client's TCP retransmits into nothing (a connected UDP socket sends into nothing) until its own
timeouts fire. Cilium destroys such sockets; so does this, with the kernel's sock_diag
SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY, built into this kernel): TCP sockets are aborted (the
peer gets a RST, the application ECONNABORTED), connected UDP sockets are disconnected with
ECONNABORTED pending, so a client blocked in recv() wakes up at once.

Why netlink and not Cilium's way (a BPF iterator over tcp/udp sockets calling the
bpf_sock_destroy kfunc, Linux 6.5): bcc 0.26, which loads this project's programs, can load
iterators but cannot call kfuncs, and an iterator walks one network namespace just as a
sock_diag dump does, so it would not spare the walk over namespaces below.

Which sockets: only those the LB translated for that service. A candidate is a socket in any
network namespace on the node (every process's and every named one: the LB is attached to a
cgroup, not to namespaces) whose peer is the backend's IP:port with the service's protocol;
it is destroyed only when the LB's reverse-translation map (`lb_revnat`, keyed by the socket's
cookie, which sock_diag reports too) says it was connected through that service's VIP. A
client that reached the backend's address directly is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from l7proxy import sock_diag
from l7proxy.agent import netdev

log = logging.getLogger("l7proxy.services")

# TCP states a connection to a backend can be in (not LISTEN, TIME_WAIT or CLOSE)
TCP_STATES = sum(1 << s for s in (1, 2, 3, 4, 5, 8, 9, 11))
UDP_CONNECTED = 1 << 1  # a connected UDP socket is TCP_ESTABLISHED in sock_diag's terms

PROTOCOLS = {"TCP": (socket.IPPROTO_TCP, TCP_STATES), "UDP": (socket.IPPROTO_UDP, UDP_CONNECTED)}


# (proto "TCP"|"UDP", backend ip, backend port) -> the VIPs (ip, port) whose sockets must go
Targets = dict[tuple[str, str, int], set[tuple[str, int]]]
# (socket cookie, backend ip, backend port) -> the VIP the LB translated it from, or None
ViaLookup = Callable[[int, str, int], "tuple[str, int] | None"]


def destroy_here(targets: Targets, via: ViaLookup) -> Counter[tuple[str, str, int]]:
    """Destroy, in the calling thread's network namespace, the sockets `targets` names;
    returns how many per frontend (proto, VIP, port)."""
    destroyed: Counter[tuple[str, str, int]] = Counter()
    with sock_diag.open_diag() as nl:
        for proto_name in sorted({p for p, _, _ in targets}):
            proto, states = PROTOCOLS[proto_name]
            for sock in sock_diag.dump(nl, proto, states):
                vips = targets.get((proto_name, *sock.dst))
                if not vips:
                    continue
                vip = via(sock.cookie, *sock.dst)
                if vip in vips and sock_diag.destroy_one(nl, sock):
                    destroyed[(proto_name, *vip)] += 1
    return destroyed


def namespaces() -> list[str]:
    """One path per network namespace on the node: the agent's, every named one, every
    process's (a container's or an endpoint's client may live in a namespace without a name)."""
    seen: dict[tuple[int, int], str] = {}
    paths = ["/proc/self/ns/net"]
    with contextlib.suppress(OSError):
        paths += [str(p) for p in sorted(netdev.NETNS_DIR.iterdir())]
    with contextlib.suppress(OSError):
        paths += [f"/proc/{p}/ns/net" for p in os.listdir("/proc") if p.isdigit()]
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:  # the process left
            continue
        seen.setdefault((st.st_dev, st.st_ino), path)
    return list(seen.values())


def destroy(targets: Targets, via: ViaLookup) -> Counter[tuple[str, str, int]]:
    """Destroy the LB's sockets to gone backends in every namespace; returns how many per
    frontend (proto, VIP, port)."""
    total: Counter[tuple[str, str, int]] = Counter()
    if not targets:
        return total
    own = os.stat("/proc/self/ns/net")
    for path in namespaces():
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino):
                total += destroy_here(targets, via)
            else:
                total += netdev.in_netns(path, lambda: destroy_here(targets, via))
        except OSError as exc:  # a namespace that went away meanwhile; the others still go
            if Path(path).exists():
                log.warning("services: socket reset in %s failed: %s", path, exc)
    return total
