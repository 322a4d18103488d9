"""The agent's service operations (`service create|list|get|delete`) and the refresh that hands
every service with its current backends to the kernel.

Mixed into `Agent` (daemon.py) like AgentOps. A refresh runs after every change that can move a
backend: a service change, and every policy install (which follows each endpoint create and
delete, and each cluster ipcache or identity change). It is cheap when nothing moved: backends
are resolved in Python, the kernel side writes only the diff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter

from l7proxy.agent.api import ApiError
from l7proxy.cluster.agent_mode import default_underlay_ip
from l7proxy.cluster.kvstore import KVStoreDown
from l7proxy.services import backends as resolver
from l7proxy.services.cluster_sync import ClusterServices, ServiceExists
from l7proxy.services.lb_adapter import NullLb, make_lb
from l7proxy.services.model import Backend, Service, ServiceError, build
from l7proxy.services.table import ServiceTable

log = logging.getLogger("l7proxy.services")

NODEPORT_GC_INTERVAL = 10.0  # seconds between sweeps of NodePort's closed flows


class ServiceOps:
    lb = NullLb("not started")
    services: ServiceTable | None = None
    cluster_services: ClusterServices | None = None
    service_backends: dict[str, tuple[Backend, ...]] = {}
    terminating_endpoints: set[str] = set()  # rebound per agent in _start_services

    def _start_services(self) -> None:
        """Before the API opens: the table from SQLite, the kernel LB, a first refresh."""
        self.services = ServiceTable(self.store)
        self.service_backends = {}
        self._backend_index: dict[tuple[str, int], str] = {}
        self._frontend_backends: dict[tuple[str, int, str], set[tuple[str, int]]] = {}
        self._frontend_keys: dict[tuple[str, int, str], str] = {}  # frontend -> service key
        self.terminating_endpoints: set[str] = set()  # local endpoints in their grace period
        self.sockets_reset: Counter[str] = Counter()  # service key -> sockets reset
        self.lb = make_lb(self.datapath, self.config.sock_lb_cgroup, self._node_ip())
        self.flows.add_enricher(self._service_enrich)
        self._services_refresh()

    def _node_ip(self) -> str:
        """NodePort's address: the node's underlay IP (cluster mode only)."""
        c = self.config
        if not c.kvstore:
            return ""
        return c.underlay_ip or default_underlay_ip(c.kvstore)

    async def _services_join_cluster(self) -> None:
        """Cluster mode, after the link is up: etcd's services replace the cached table; the
        sweep of NodePort's closed flows starts (NodePort runs in cluster mode only)."""
        self._nodeport_gc_stop = asyncio.Event()
        self._nodeport_gc_task = asyncio.create_task(self._nodeport_gc(), name="nodeport gc")
        self.cluster_services = ClusterServices(self.cluster.kv, self._cluster_services_changed)
        try:
            await self.cluster_services.start()
        except KVStoreDown as exc:  # keep the cached table; the watch is not running
            log.error("services: etcd unreachable at start, running from the cache: %s", exc)
            self.cluster_services = None

    async def _cluster_services_changed(self, services: list[Service]) -> None:
        async with self._lock:
            if self.services.replace(services):
                await asyncio.to_thread(self._services_refresh)

    async def _nodeport_gc(self) -> None:
        """Every NODEPORT_GC_INTERVAL until stopped; a sweep in progress finishes first (the
        maps' fds stay open until then)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._nodeport_gc_stop.wait(), NODEPORT_GC_INTERVAL)
                return
            try:
                removed = await asyncio.to_thread(self.lb.gc)
            except Exception:  # best effort: LRU eviction still bounds the maps
                log.exception("services: NodePort flow GC failed")
            else:
                if removed:
                    log.debug("services: %d closed NodePort flows removed", removed)

    async def _stop_services(self) -> None:
        task = getattr(self, "_nodeport_gc_task", None)
        if task is not None:
            self._nodeport_gc_stop.set()
            await task
        if self.cluster_services is not None:
            await self.cluster_services.close()
        self.lb.close()

    def _register_service_ops(self) -> None:
        self.api.op("service.create", self.op_service_create)
        self.api.op("service.list", self.op_service_list)
        self.api.op("service.get", self.op_service_get)
        self.api.op("service.delete", self.op_service_delete)

    # -- refresh ---------------------------------------------------------------------------------

    def _known_endpoints(self) -> list[resolver.KnownEndpoint]:
        known = {
            ep.ip: resolver.KnownEndpoint(
                ep.name, ep.ip, tuple(ep.labels), ep.name in self.terminating_endpoints
            )
            for ep in self.store.endpoints()
            if ep.ip  # an IPv6-only endpoint: services have IPv4 backends only
        }
        if self.cluster is not None:
            for ip, entry in list(self.cluster.remote_ips.items()):  # the loop may add some
                # a dual-stack cluster publishes pods' IPv6 addresses too: not service backends
                if ip not in known and ":" not in ip:
                    labels = tuple(self._labels_of(entry.identity))
                    known[ip] = resolver.KnownEndpoint("", ip, labels)
        return list(known.values())

    def _services_refresh(self) -> None:
        """Resolve every service's backends and write the kernel's diff (any thread, under the
        agent lock or before the API opens)."""
        if self.services is None:
            return
        known = self._known_endpoints()
        plan, current, index, frontends, keys = [], {}, {}, {}, {}
        for svc in self.services.all():
            chosen = resolver.resolve(svc, known)
            plan.append((svc, chosen))
            current[svc.key] = chosen
            keys[(svc.vip, svc.port, svc.protocol)] = svc.key
            frontends[(svc.vip, svc.port, svc.protocol)] = {(b.ip, b.port) for b in chosen}
            for b in chosen:
                index[(b.ip, b.port)] = svc.name
        self.lb.sync(plan)  # first: from here on no new flow goes to a backend that left
        gone = _gone(self._frontend_backends, frontends)
        self.service_backends, self._backend_index = current, index
        self._frontend_backends = frontends
        if gone:
            try:
                reset = self.lb.terminate(gone)
            except Exception:  # best effort: the LB is right, the sockets time out on their own
                log.exception("services: resetting sockets to removed backends failed")
            else:
                for (proto, vip, port), n in reset.items():
                    # every gone frontend had a service before this refresh
                    self.sockets_reset[self._frontend_keys[(vip, port, proto)]] += n
                if reset:
                    log.info("services: reset %d sockets to removed backends", reset.total())
        self._frontend_keys = keys

    async def _endpoint_terminate(self, name: str, grace: float) -> None:
        """An endpoint's deletion grace period (`endpoint delete --grace-period`): it takes no
        new service flow from now on, its established connections go on; the caller deletes
        it afterwards (and the refresh then resets what is still connected), then discards the
        name from `terminating_endpoints`."""
        async with self._lock:
            if self.store.endpoint(name) is None:
                raise ApiError(f"no endpoint named {name}")
            self.terminating_endpoints.add(name)
            await asyncio.to_thread(self._services_refresh)
        await asyncio.sleep(grace)

    def _service_enrich(self, flow: dict) -> None:
        """A flow to a backend names its service (observe, the flow log): the packets carry
        the backend's address, the VIP was translated away at connect()."""
        dst = flow.get("destination")
        if not isinstance(dst, dict) or not self._backend_index:
            return
        for l4 in (flow.get("l4") or {}).values():
            if isinstance(l4, dict) and "destination_port" in l4:
                name = self._backend_index.get((dst.get("ip"), l4["destination_port"]))
                if name:
                    flow.setdefault("service", name)
                return

    def services_status(self) -> dict:
        return self.lb.status()

    # -- operations ----------------------------------------------------------------------------

    def _describe(self, svc: Service) -> dict:
        out = svc.to_json()
        out["endpoints"] = [
            {"ip": b.ip, "port": b.port, "endpoint": b.endpoint, "terminating": b.terminating}
            for b in self.service_backends.get(svc.key, ())
        ]
        return out

    async def op_service_create(self, args: dict) -> dict:
        try:
            svc = build(
                name=str(args.get("name") or ""),
                vip=str(args.get("vip") or ""),
                selector=str(args.get("selector") or ""),
                target_port=args.get("target_port"),
                backends=list(args.get("backends") or []),
                node_port=args.get("node_port"),
                affinity=str(args.get("affinity") or "none"),
                affinity_timeout=args.get("affinity_timeout"),
                dsr=bool(args.get("dsr")),
                algorithm=str(args.get("algorithm") or "random"),
                namespace=str(args.get("namespace") or "default"),
                created=time.time(),
            )
        except (ServiceError, TypeError, ValueError) as exc:
            raise ApiError(str(exc)) from None
        self._check_new(svc)
        if self.cluster_services is not None:
            try:
                await self.cluster_services.create(svc)
            except ServiceExists as exc:
                raise ApiError(str(exc)) from None
            except KVStoreDown as exc:
                raise ApiError(
                    f"service create needs the kvstore: {exc}; nothing changed, "
                    "run it again when etcd is back"
                ) from None
        elif self.cluster is not None:
            raise ApiError("service create needs the kvstore, which was down at agent start")
        async with self._lock:
            self._check_new(svc)  # re-checked under the lock (the watch may have brought it)
            self.services.put(svc)
            await asyncio.to_thread(self._services_refresh)
        out = self._describe(svc)
        missing = self.lb.nodeport_missing() if (svc.node_port or svc.dsr) else ""
        if missing:  # stored (other nodes may serve it), but say this node does not
            what = f"node port {svc.node_port}" if svc.node_port else "DSR"
            out["warnings"] = [f"{what} is stored but not served on this node: {missing}"]
        return out

    def _check_new(self, svc: Service) -> None:
        old = self.services.get(svc.key)
        if old is not None and old != svc:
            raise ApiError(f"service {svc.name} already exists (delete it first)")
        other = self.services.by_frontend(svc.vip, svc.port, svc.protocol)
        if other is not None and other.key != svc.key:
            raise ApiError(f"{svc.frontend} is already the VIP of service {other.name}")
        if svc.node_port:
            for s in self.services.all():
                if s.key != svc.key and s.node_port == svc.node_port:
                    raise ApiError(f"node port {svc.node_port} is taken by service {s.name}")

    async def op_service_list(self, args: dict) -> list[dict]:
        return [self._describe(s) for s in self.services.all()]

    async def op_service_get(self, args: dict) -> dict:
        svc = self.services.get(_key(args))
        if svc is None:
            raise ApiError(f"no service named {args.get('name')!r}")
        return self._describe(svc)

    async def op_service_delete(self, args: dict) -> dict:
        key = _key(args)
        if self.services.get(key) is None:
            raise ApiError(f"no service named {args.get('name')!r}")
        if self.cluster is not None:
            if self.cluster_services is None:
                raise ApiError("service delete needs the kvstore, which was down at agent start")
            namespace, _, name = key.partition("/")
            try:
                await self.cluster_services.delete(namespace, name)
            except KVStoreDown as exc:
                raise ApiError(
                    f"service delete needs the kvstore: {exc}; nothing changed, "
                    "run it again when etcd is back"
                ) from None
        async with self._lock:
            self.services.delete(key)
            await asyncio.to_thread(self._services_refresh)
        return {"deleted": args.get("name")}


def _key(args: dict) -> str:
    return f"{args.get('namespace') or 'default'}/{args.get('name') or ''}"


def _gone(before: dict, after: dict) -> dict[tuple[str, str, int], set[tuple[str, int]]]:
    """The backends that left each frontend (terminating ones have not left), as
    sock_terminate's targets: (proto, backend ip, port) -> the VIPs whose sockets must go."""
    out: dict[tuple[str, str, int], set[tuple[str, int]]] = {}
    for (vip, port, proto), backends in before.items():
        for ip, bport in backends - after.get((vip, port, proto), set()):
            out.setdefault((proto, ip, bport), set()).add((vip, port))
    return out
