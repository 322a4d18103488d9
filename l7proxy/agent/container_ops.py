"""Container endpoints: a namespace made by a container runtime, adopted through the CNI plugin.

`endpoint.adopt` is the plugin's ADD: the agent plumbs a veth into the runtime's namespace (by
path), gives it an address from the node's pool, labels it and attaches the datapath, exactly as
`endpoint.create` does for a namespace it makes itself. `endpoint.release` is DEL (idempotent: an
unknown container is released already) and `endpoint.check` is CHECK. An endpoint is keyed by
(container id, interface name), the pair CNI keys attachments by. In sidecar mode the sidecar
proxy attaches the connect() hooks once the runtime has made the container's cgroup (after ADD;
sidecar_proxy.py). Mixed into `Agent`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time

from l7proxy.agent import netdev
from l7proxy.agent.api import ApiError
from l7proxy.agent.ops import labelset, normalize_labels
from l7proxy.agent.store import EndpointRow

log = logging.getLogger("l7proxy.agent")

CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")  # CNI's rule for CNI_CONTAINERID
IFNAME = re.compile(r"^[^\s/:]{1,15}$")  # IFNAMSIZ - 1, no '/', ':' or whitespace
NAME = re.compile(r"[^A-Za-z0-9_.\-]")


def endpoint_name(container_id: str, pod_name: str, taken) -> str:
    """The pod (or container) name when it is free, else it with the id's first 12 characters,
    else the id itself: names are what `endpoint list` and `observe` show."""
    base = NAME.sub("-", pod_name)[:60].strip("-.") if pod_name else ""
    for name in (base, f"{base}-{container_id[:12]}" if base else "", container_id[:12]):
        if name and name not in taken:
            return name
    return container_id


class ContainerOps:
    def _register_container_ops(self) -> None:
        self.api.op("endpoint.adopt", self.op_endpoint_adopt)
        self.api.op("endpoint.release", self.op_endpoint_release)
        self.api.op("endpoint.check", self.op_endpoint_check)

    def _container_endpoint(self, container_id: str, ifname: str) -> EndpointRow | None:
        for ep in self.store.endpoints():
            if ep.container_id == container_id and ep.ifname == ifname:
                return ep
        return None

    async def op_endpoint_adopt(self, args: dict) -> dict:
        container_id, ifname = _key(args)
        netns_path = str(args.get("netns") or "")
        if not netns_path.startswith("/") or not os.path.exists(netns_path):
            raise ApiError(f"network namespace {netns_path!r} does not exist")
        runtime = str(args.get("runtime") or "cni")[:32]
        labels = normalize_labels(args.get("labels") or [])
        async with self._lock:
            known = self._container_endpoint(container_id, ifname)
            if known is not None:
                if known.netns != netns_path:
                    raise ApiError(
                        f"container {container_id[:12]} {ifname} is attached in {known.netns}"
                    )
                return known.to_json()  # an ADD repeated by the runtime: same answer
            eps = self.store.endpoints()
            name = endpoint_name(
                container_id, str(args.get("pod_name") or ""), {e.name for e in eps}
            )
            ip = self.pool.allocate([ep.ip for ep in eps])
            ip6 = self._allocate_ip6(None)  # "" unless the agent is dual stack (--pool6)
            host_if = netdev.host_ifname(f"{container_id}/{ifname}")
            row = EndpointRow(
                name,
                netns_path,
                host_if,
                ip,
                32,
                tuple(labels),
                await self._cluster_identity(labels)  # cluster mode: etcd's id for these labels
                if self.cluster is not None
                else self.allocator.allocate(labelset(labels)),
                time.time(),
                (),
                container_id,
                runtime,
                ifname,
                ip6=ip6,
            )
            try:
                mac = await asyncio.to_thread(
                    netdev.adopt, netns_path, host_if, ifname, ip, 32, self.pool.router,
                    *self._v6(row),
                )  # fmt: skip
            except BaseException:
                self._release_identity(row.identity)  # a failed ADD leaves nothing behind
                raise
            await self._register(row, lambda: netdev.release(host_if))
        return {**row.to_json(), "mac": mac, **self._routers(row)}

    async def op_endpoint_release(self, args: dict) -> dict:
        container_id, ifname = _key(args)
        async with self._lock:
            ep = self._container_endpoint(container_id, ifname)
            if ep is None:
                return {"released": None}  # DEL is idempotent: nothing left to remove
            await self._unregister(ep, lambda: netdev.release(ep.host_if))
        return {"released": ep.name}

    async def op_endpoint_check(self, args: dict) -> dict:
        container_id, ifname = _key(args)
        ep = self._container_endpoint(container_id, ifname)
        if ep is None:
            raise ApiError(f"container {container_id[:12]} has no endpoint on {ifname}")
        problems = await asyncio.to_thread(_problems, ep)
        if problems:
            raise ApiError(f"endpoint {ep.name} is broken: {'; '.join(problems)}")
        return {**ep.to_json(), **self._routers(ep)}

    def _routers(self, row: EndpointRow) -> dict:
        """The gateways the CNI result names: IPv4, and IPv6 for a dual-stack endpoint."""
        router6 = self._v6(row)[1]
        return {"router": self.pool.router, **({"router6": router6} if router6 else {})}

    def _reap_dead_containers(self) -> list[str]:
        """At start: forget container endpoints whose namespace went away while the agent was
        down (the runtime's DEL could not reach it). Runs before the datapath attaches."""
        gone = []
        for ep in self.store.endpoints():
            if ep.adopted and not (os.path.exists(ep.netns) and netdev.link_exists(ep.host_if)):
                netdev.release(ep.host_if)
                self.datapath.endpoint_removed(ep.name, ep.host_if, ep.ip, ep.ip6)
                self.store.delete_endpoint(ep.name)
                self.endpoint_ids.pop(ep.name, None)
                self._release_identity(ep.identity)
                gone.append(ep.name)
        if gone:
            self.store.put("endpoint_ids", self.endpoint_ids)
            log.info("removed container endpoints whose containers are gone: %s", gone)
        return gone


def _key(args: dict) -> tuple[str, str]:
    container_id = str(args.get("container_id") or "")
    ifname = str(args.get("ifname") or "eth0")
    if not CONTAINER_ID.match(container_id):
        raise ApiError(f"bad container id {container_id!r}")
    if not IFNAME.match(ifname):
        raise ApiError(f"bad interface name {ifname!r}")
    return container_id, ifname


def _problems(ep: EndpointRow) -> list[str]:
    out = []
    if not os.path.exists(ep.netns):
        return [f"namespace {ep.netns} is gone"]
    if not netdev.link_exists(ep.host_if):
        out.append(f"host veth {ep.host_if} is missing")
    inner = netdev.inner_address(ep.netns, ep.ifname)
    if inner != ep.ip:
        out.append(f"{ep.ifname} in the container has {inner or 'no address'}, not {ep.ip}")
    return out
