"""Node-mode redirection: bpf_sk_assign to a real transparent listener, original destination from
the accepted socket, marked upstream connections, and fail-closed when no proxy listens."""

from __future__ import annotations

import contextlib
import socket
import threading

import pytest

from l7proxy import platform
from policies import EGRESS, INGRESS, PolicyEntry, PolicyKey
from tests.kernel.conftest import drain, fresh_reader
from tests.kernel.netns import BLOCKED, sock_in, tcp_ok

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(60)]

TCP = 6
ALLOW = PolicyEntry(False, 0, ("test",))


def REDIRECT(l7_id):  # noqa: N802
    return PolicyEntry(False, l7_id, ("test",))


class SocketTransport:
    """Just enough of an asyncio transport for the destination resolvers."""

    def __init__(self, sock):
        self.sock = sock

    def get_extra_info(self, name):
        return {"sockname": self.sock.getsockname(), "peername": self.sock.getpeername()}[name]


class SpliceProxy:
    """A tiny transparent L4 proxy: accepts what the datapath assigns to it, looks up the
    source identity, and connects upstream to the original destination with the proxy mark."""

    def __init__(self, identity_of, mark: bool = True):
        self.listener = platform.transparent_listener(0)
        self.port = self.listener.getsockname()[1]
        self.identity_of = identity_of
        self.mark = mark
        self.accepted: list[tuple[tuple[str, int], tuple[str, int]]] = []  # (peer, orig dst)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return
            orig = platform.original_dst_transparent(conn)
            # the ConnContext resolver gives the same answer from a transport's extra info
            resolved = platform.TransparentDestination()(SocketTransport(conn))
            assert (resolved.host, resolved.port) == orig
            self.accepted.append((peer, orig))
            threading.Thread(target=self._serve, args=(conn, peer, orig), daemon=True).start()

    def _serve(self, conn, peer, orig):
        up = socket.socket()
        try:
            if self.mark:
                platform.mark_upstream(up, self.identity_of(peer[0]))
            up.settimeout(5)
            up.connect(orig)
            up.settimeout(None)
        except OSError:
            conn.close()
            up.close()
            return
        for src, dst in ((conn, up), (up, conn)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self):
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


def test_egress_redirect_reaches_transparent_proxy_with_original_destination(clean):
    t = clean
    a, b, _ = t.pods
    server = t.servers[1]
    proxy = SpliceProxy(t.dp.ipcache_lookup)
    reader = fresh_reader(t.dp)
    try:
        # A's egress to B's port goes through L7 rule set 7; B accepts only A's identity, so the
        # proxy's upstream connection only passes with A's identity in its mark.
        t.dp.sync_endpoint(
            t.ids[0],
            {PolicyKey(t.identities[1], EGRESS, TCP, server.port, 16): REDIRECT(7)},
            ingress_enforced=False,
            egress_enforced=True,
            proxy_ports={7: proxy.port},
        )
        t.dp.sync_endpoint(
            t.ids[1],
            {PolicyKey(t.identities[0], INGRESS, TCP, 0, 0): ALLOW},
            ingress_enforced=True,
            egress_enforced=False,
        )
        s = sock_in(a.netns)
        s.settimeout(5)
        s.connect((b.pod_ip, server.port))
        for i in range(20):  # several round trips over the same redirected flow
            msg = f"hello {i}".encode()
            s.sendall(msg)
            assert s.recv(64) == msg
        s.close()
        flows = drain(reader)
    finally:
        reader.stop()
        proxy.close()
    assert len(proxy.accepted) == 1
    peer, orig = proxy.accepted[0]
    assert peer[0] == a.pod_ip
    assert orig == (b.pod_ip, server.port)
    assert server.peers[-1][0] == b.host_ip  # B saw the proxy's upstream connection
    redirected = [f for f in flows if f["verdict"] == "REDIRECTED"]
    assert redirected and redirected[0]["proxy_port"] == proxy.port
    assert redirected[0]["source"]["identity"] == t.identities[0]
    assert redirected[0]["destination"]["identity"] == t.identities[1]
    # The upstream leg arrives at B's ingress with A's identity (from the mark).
    upstream = [
        f for f in flows if f["traffic_direction"] == "INGRESS" and f["source"]["ip"] == b.host_ip
    ]
    assert upstream and upstream[0]["verdict"] == "FORWARDED"
    assert upstream[0]["source"]["identity"] == t.identities[0]


def test_ingress_redirect_of_a_local_destination(clean):
    t = clean
    a, b, c = t.pods
    server = t.servers[1]
    proxy = SpliceProxy(t.dp.ipcache_lookup)
    try:
        t.dp.sync_endpoint(
            t.ids[1],
            {PolicyKey(t.identities[0], INGRESS, TCP, server.port, 16): REDIRECT(9)},
            ingress_enforced=True,
            egress_enforced=False,
            proxy_ports={9: proxy.port},
        )
        assert tcp_ok(a.netns, b.pod_ip, server.port, timeout=5)
        assert proxy.accepted and proxy.accepted[0][1] == (b.pod_ip, server.port)
        assert not tcp_ok(c.netns, b.pod_ip, server.port, timeout=BLOCKED)  # C has no entry at all
        # A redirected flow survives an unrelated policy change (it is re-checked, not cut).
        s = sock_in(a.netns)
        s.settimeout(5)
        s.connect((b.pod_ip, server.port))
        s.sendall(b"before")
        assert s.recv(16) == b"before"
        t.dp.sync_endpoint(
            t.ids[1],
            {
                PolicyKey(t.identities[0], INGRESS, TCP, server.port, 16): REDIRECT(9),
                PolicyKey(t.identities[2], INGRESS, 17, 0, 0): ALLOW,
            },
            ingress_enforced=True,
            egress_enforced=False,
            proxy_ports={9: proxy.port},
        )
        s.sendall(b"after")
        assert s.recv(16) == b"after"
        s.close()
        assert len(proxy.accepted) == 2
    finally:
        proxy.close()


def test_unmarked_host_traffic_cannot_skip_the_proxy(clean):
    t = clean
    a, b, _ = t.pods
    server = t.servers[1]
    proxy = SpliceProxy(t.dp.ipcache_lookup, mark=False)
    try:
        t.dp.sync_endpoint(
            t.ids[1],
            {PolicyKey(0, INGRESS, TCP, server.port, 16): REDIRECT(9)},
            ingress_enforced=True,
            egress_enforced=False,
            proxy_ports={9: proxy.port},
        )
        # Without the mark the proxy's upstream leg is just host traffic that wants the
        # proxy, which the to-endpoint hook cannot provide: dropped, fail closed.
        assert not tcp_ok(a.netns, b.pod_ip, server.port, timeout=BLOCKED)
        assert proxy.accepted  # the client leg did reach the proxy
    finally:
        proxy.close()


def test_fail_closed_when_no_proxy_listens(clean):
    t = clean
    a, b, _ = t.pods
    server = t.servers[1]
    proxy = SpliceProxy(t.dp.ipcache_lookup)
    reader = fresh_reader(t.dp)
    try:
        t.dp.sync_endpoint(
            t.ids[0],
            {PolicyKey(t.identities[1], EGRESS, TCP, server.port, 16): REDIRECT(7)},
            ingress_enforced=False,
            egress_enforced=True,
            proxy_ports={7: proxy.port},
        )
        assert tcp_ok(a.netns, b.pod_ip, server.port, timeout=5)
        proxy.close()  # the proxy goes away
        assert not tcp_ok(a.netns, b.pod_ip, server.port, timeout=BLOCKED)
        # No proxy port known for the rule set at all: also dropped, never passed through.
        t.dp.sync_endpoint(
            t.ids[0],
            {PolicyKey(t.identities[1], EGRESS, TCP, server.port, 16): REDIRECT(8)},
            ingress_enforced=False,
            egress_enforced=True,
            proxy_ports={},
        )
        assert not tcp_ok(a.netns, b.pod_ip, server.port, timeout=BLOCKED)
        flows = drain(reader)
    finally:
        reader.stop()
        proxy.close()
    no_proxy = [f for f in flows if f["drop_reason_desc"] == "NO_PROXY"]
    assert len({f["l4"]["TCP"]["source_port"] for f in no_proxy}) >= 2
    assert all(f["verdict"] == "DROPPED" for f in no_proxy)
    assert no_proxy[0]["source"]["identity"] == t.identities[0]
    assert not any(
        f["verdict"] == "FORWARDED" and f["traffic_direction"] == "INGRESS"
        for f in flows
        if f["l4"].get("TCP", {}).get("source_port")
        in {x["l4"]["TCP"]["source_port"] for x in no_proxy}
    )


def test_a_pod_cannot_forge_the_proxy_mark(clean):
    t = clean
    a, b, c = t.pods
    server = t.servers[1]
    t.dp.sync_endpoint(
        t.ids[1],
        {PolicyKey(t.identities[0], INGRESS, TCP, 0, 0): ALLOW},
        ingress_enforced=True,
        egress_enforced=False,
    )
    s = sock_in(c.netns)
    try:
        # C claims to be the proxy carrying A's identity: the veth clears the mark.
        platform.mark_upstream(s, t.identities[0])
        s.settimeout(BLOCKED)
        with pytest.raises(OSError):
            s.connect((b.pod_ip, server.port))
    finally:
        s.close()
    assert tcp_ok(a.netns, b.pod_ip, server.port)  # A itself is allowed
