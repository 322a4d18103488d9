"""A TCP relay whose bytes never reach user space: each accepted connection and its upstream
connection sit in a sockmap, and an sk_skb stream verdict program sends every segment that
arrives on one out of the other (bpf_sk_redirect_map, egress). Bench-only (issue 20): the Kafka
produce floor row measures what handing bodies over in the kernel would leave of the second TCP
connection's cost, with no L7 check at all.

Run as `python -m tests.bench.sockmap_relay LISTEN_PORT UPSTREAM_PORT` (root, bcc and kernel
headers, as the datapath needs); prints `ready` once listening; SIGTERM ends it, and the program
goes with the process's map.

The first bytes a client sends before its socket is in the map stay in the socket's own queue;
the relay reads and forwards those once. A Kafka client waits for its ApiVersions answer before
it sends more, so nothing overtakes them.
"""

from __future__ import annotations

import ctypes
import signal
import socket
import struct
import sys

PROGRAM = r"""
#include <uapi/linux/bpf.h>
BPF_HASH(peer_slot, u32, u32, 1024);  /* socket cookie (low 32 bits) -> sockmap slot of its peer */
int relay(struct __sk_buff *skb) {
    u32 cookie = bpf_get_socket_cookie(skb);
    u32 *slot = peer_slot.lookup(&cookie);
    if (!slot)
        return SK_PASS;
    u32 key = *slot;
    return bpf_sk_redirect_map(skb, (void *)bpf_pseudo_fd(1, SOCKMAP_FD), key, 0);
}
"""
SO_COOKIE = 57
SLOTS = 1024


def _cookie(sock: socket.socket) -> int:
    raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8)
    return struct.unpack("Q", raw)[0] & 0xFFFFFFFF


def main(listen_port: int, upstream_port: int) -> int:
    from bcc import BPF, BPFAttachType
    from bcc.libbcc import lib

    # bcc 0.26's Python side has no sockmap table type: the map comes from a module of its own
    # and the program names it by fd.
    holder = BPF(text=f"BPF_SOCKMAP(socks, {SLOTS});")
    sockmap = lib.bpf_table_fd(holder.module, b"socks")
    if sockmap < 0:
        print("no sockmap", file=sys.stderr)
        return 1
    bpf = BPF(text=PROGRAM.replace("SOCKMAP_FD", str(sockmap)))
    prog = bpf.load_func("relay", BPF.SK_SKB)
    BPF.attach_func(prog, sockmap, BPFAttachType.SK_SKB_STREAM_VERDICT)
    peers = bpf["peer_slot"]

    def put(slot: int, sock: socket.socket) -> None:
        key, fd = ctypes.c_uint(slot), ctypes.c_int(sock.fileno())
        if lib.bpf_update_elem(sockmap, ctypes.byref(key), ctypes.byref(fd), 0) != 0:
            raise OSError(ctypes.get_errno(), "sockmap update failed")

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", listen_port))
    listener.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print("ready", flush=True)
    held = []  # the sockets stay open as long as the relay runs
    for slot in range(0, SLOTS, 2):
        client, _ = listener.accept()
        upstream = socket.create_connection(("127.0.0.1", upstream_port))
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        put(slot + 1, upstream)
        peers[ctypes.c_uint(_cookie(upstream))] = ctypes.c_uint(slot)
        peers[ctypes.c_uint(_cookie(client))] = ctypes.c_uint(slot + 1)
        put(slot, client)
        client.setblocking(False)
        try:
            early = client.recv(1 << 16)
        except BlockingIOError:
            early = b""
        if early:
            upstream.sendall(early)
        held.append((client, upstream))
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2])))
