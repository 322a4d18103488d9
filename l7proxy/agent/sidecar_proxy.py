"""The sidecar proxy (`--mode sidecar`): one proxy listener per endpoint, fed by cgroup connect() redirection.

Each endpoint gets a cgroup (`<cgroup root>/l7proxy/<netns>`); processes started with
`l7proxy endpoint exec` run in it. The datapath's cgroup/connect4 program rewrites a connect()
that the endpoint's egress policy marks for L7 to 127.0.0.1:<sidecar port> *inside the endpoint's
namespace*, where this module listens; sock_ops stores the original destination by the
connection (namespace cookie, client address, sidecar port), and the sidecar pops it per
connection. The node proxy keeps serving ingress L7
redirects from tc, so the same policy files work unchanged. The sidecar's upstream sockets live
in the host namespace and carry the source identity in SO_MARK like the node proxy's.

A container's endpoint (CNI ADD) uses the container's own cgroup instead, which its runtime makes
only after ADD: the listener opens in the container's namespace at once, and the hooks attach when
`CgroupWatcher` sees the cgroup appear (docs/cni.md, "Sidecar mode"). Until then the endpoint's
tc programs on the host veth enforce the same policy, L7 through the node proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import threading
from pathlib import Path

from l7proxy.agent.connection_rules import connection_policy
from l7proxy.agent.container_cgroups import CgroupWatcher
from l7proxy.agent.netdev import CGROUP_ROOT, cgroup_path
from l7proxy.agent.node_proxy import NodeProxy, marked_destination
from l7proxy.platform import SidecarMap
from l7proxy.server import Gate
from redirect_bpf import structs

log = logging.getLogger("l7proxy.agent")

CLONE_NEWNET = 0x40000000


def listen_in_netns(netns_name: str, host: str = "127.0.0.1") -> socket.socket:
    """A listening socket created inside a namespace, named or by path (a container's); setns on
    a short-lived thread: the switch is per thread, and the socket keeps its namespace."""
    result: dict = {}
    path = netns_name if netns_name.startswith("/") else f"/var/run/netns/{netns_name}"

    def work() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({netns_name}) failed")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(1024)
            sock.setblocking(False)
            result["sock"] = sock
        except BaseException as exc:  # handed to the caller's thread
            result["error"] = exc

    thread = threading.Thread(target=work, name=f"netns-{netns_name}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["sock"]


class SidecarGate(Gate):
    __slots__ = ("proxy", "endpoint")

    def __init__(self, proxy: SidecarProxy, endpoint) -> None:
        super().__init__(proxy.base)
        self.proxy, self.endpoint = proxy, endpoint

    def connection_made(self, transport) -> None:
        peer = transport.get_extra_info("peername") or ("127.0.0.1", 0)
        try:
            origin = self.proxy.sidecar_map.pop(transport.get_extra_info("socket"))
        except OSError:  # the client is gone already (no peer address)
            origin = None
        if origin is None:  # not sent by the connect4 hook: nothing to proxy to
            transport.abort()
            return
        dns = self.proxy.agent.dns_proxy
        dst = (origin.ip, origin.port)
        if dns is not None and dns.takes_tcp(self.endpoint.ip, dst):  # DNS over TCP (issue 21)
            dns.adopt_tcp(transport, (self.endpoint.ip, peer[1]), dst)
            return
        self.lst = self.proxy.sidecar_view(self.endpoint, origin)
        super().connection_made(transport)


class SidecarProxy(NodeProxy):
    """The node proxy (ingress L7 from tc) plus one sidecar listener per endpoint (egress L7)."""

    def __init__(self, agent, config=None) -> None:
        super().__init__(agent, config=config)
        self.sidecar_map = SidecarMap(agent.datapath.pin_dir)
        self.sidecars: dict[str, tuple[object, int]] = {}
        self.sidecar_connections: dict[str, int] = {}
        self.cgroups = CgroupWatcher(CGROUP_ROOT)
        self.container_cgroups: dict[str, tuple[Path, int]] = {}  # name -> (cgroup, its id)

    async def start(self) -> None:
        await super().start()
        self.cgroups.start()
        for ep in self.agent.store.endpoints():
            await self.endpoint_added(ep)
        await asyncio.to_thread(self._forget_stale_cgroups)

    def _forget_stale_cgroups(self) -> None:
        """After a restart: entries for cgroups no endpoint holds now (a container removed while
        the agent was down; its cgroup went with it) leave the map."""
        held = {cg_id for _, cg_id in self.container_cgroups.values()}
        for ep in self.agent.store.endpoints():
            if not ep.adopted:
                with contextlib.suppress(OSError):
                    held.add(cgroup_path(ep.netns).stat().st_ino)
        table = self.agent.datapath.dp.maps["ep_by_cgroup"]
        for key, _ in list(table.items()):
            if key.value not in held:
                with contextlib.suppress(KeyError, OSError):
                    table.delete(key)

    async def endpoint_added(self, ep) -> None:
        sock = await asyncio.to_thread(listen_in_netns, ep.netns)
        port = sock.getsockname()[1]
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SidecarGate(self, ep), sock=sock)
        self.sidecars[ep.name] = (server, port)
        if ep.adopted:  # the runtime makes the container's cgroup after ADD
            self.cgroups.wait_for(
                ep.container_id, lambda path: self._attach_container(ep, path, port)
            )
            return
        cg = cgroup_path(ep.netns)
        cg.mkdir(parents=True, exist_ok=True)
        ep_id = self.agent.endpoint_ids[ep.name]
        dp = self.agent.datapath.dp

        def attach() -> None:
            # After an agent restart the programs are still attached to the cgroup (pinned);
            # attaching again fails with EEXIST, but the new sidecar port is already stored.
            with contextlib.suppress(OSError):
                dp.attach_cgroup(cg, ep_id, ep.identity, sidecar_port=port)

        await asyncio.to_thread(attach)

    def _attach_container(self, ep, path: Path, port: int) -> None:
        """The container's cgroup appeared: attach its hooks now, on the loop's thread (a few
        bpf() calls, no netlink), since its first process starts some 70 ms later."""
        if self.sidecars.get(ep.name, (None, 0))[1] != port:
            return  # released (or re-added) meanwhile
        try:
            cg_id = self.agent.datapath.dp.attach_cgroup(
                path, self.agent.endpoint_ids[ep.name], ep.identity, sidecar_port=port
            )
        except OSError as exc:
            if not path.is_dir():
                return  # the container is gone already
            # After an agent restart the pinned programs are attached already (see above).
            log.info("container %s: cgroup hooks on %s: %s", ep.name, path, exc)
            cg_id = os.stat(path).st_ino
        self.container_cgroups[ep.name] = (path, cg_id)

    def cgroup_of(self, ep) -> str:
        """Where the endpoint's connect() hooks sit; "" while a container's cgroup is pending."""
        if not ep.adopted:
            return str(cgroup_path(ep.netns))
        found = self.container_cgroups.get(ep.name)
        return str(found[0]) if found else ""

    async def endpoint_removed(self, ep) -> None:
        entry = self.sidecars.pop(ep.name, None)
        if entry is not None:
            entry[0].close()
        if ep.adopted:  # the cgroup is the runtime's: detach only
            self.cgroups.cancel(ep.container_id)
            found = self.container_cgroups.pop(ep.name, None)
            if found is not None:
                await asyncio.to_thread(self.agent.datapath.dp.detach_cgroup, found[0])
                with contextlib.suppress(OSError, KeyError):  # gone with its cgroup already
                    self.agent.datapath.dp.maps["ep_by_cgroup"].delete(structs.u64(found[1]))
            return
        cg = cgroup_path(ep.netns)
        await asyncio.to_thread(self.agent.datapath.dp.detach_cgroup, cg)
        with contextlib.suppress(OSError):
            cg.rmdir()

    def sidecar_view(self, ep, origin):
        self.sidecar_connections[ep.name] = self.sidecar_connections.get(ep.name, 0) + 1
        cp = connection_policy(self.agent, ep.ip or ep.ip6, origin.ip, origin.port)
        dest = marked_destination(origin.ip, origin.port, cp.src_identity)
        lst = self._listener(
            origin.port, cp.decision, cp.rules, (cp.dst_identity, cp.dst_labels), dest
        )
        lst.direction = "EGRESS"
        return lst

    def status(self) -> dict:
        ports = ", ".join(
            f"{n}:{p} ({self.sidecar_connections.get(n, 0)} conns)"
            for n, (_, p) in sorted(self.sidecars.items())
        )
        return {
            "state": "ok",
            "detail": f"node proxy on {self.host}:{self.port}; sidecars {ports or 'none'}; "
            f"{self.connections} node-proxy connections",
        }

    async def close(self) -> None:
        self.cgroups.close()
        for server, _ in self.sidecars.values():
            server.close()
        self.sidecar_map.close()
        await super().close()
