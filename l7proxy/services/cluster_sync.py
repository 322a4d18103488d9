"""Services in the cluster's etcd, watched by every agent.

Key: `cilium/state/services/v1/<cluster>/<namespace>/<name>`, Cilium's prefix for services it
shares through the kvstore (there it holds a ClusterService written by the operator; here the
Service record of model.py as JSON). Not leased: a service outlives the node that created it.
`service create` is one transaction that fails if the key exists, so two nodes cannot both
create a name; the watch brings every change to every node (this one included), each node
resolves the backends itself from the endpoints it knows (local ones and the cluster's ipcache).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from l7proxy.cluster import keys
from l7proxy.cluster.kvstore import Item, KVStore, WatchEvent, absent, put
from l7proxy.cluster.watch import ResumableWatch
from l7proxy.services.model import Service, ServiceError

log = logging.getLogger("l7proxy.services")

PREFIX = f"cilium/state/services/v1/{keys.CLUSTER}/"


def service_key(namespace: str, name: str) -> str:
    return f"{PREFIX}{namespace}/{name}"


class ServiceExists(Exception):
    pass


class ClusterServices:
    def __init__(self, kv: KVStore, on_change: Callable[[list[Service]], Awaitable[None]]) -> None:
        self.kv = kv
        self.on_change = on_change
        self.services: dict[str, Service] = {}  # "namespace/name" -> service
        self.rejected: dict[str, str] = {}  # etcd key -> why its value was not taken
        self._task: asyncio.Task | None = None
        self.watch: ResumableWatch | None = None

    async def start(self) -> None:
        items, revision = await self.kv.list(PREFIX)
        self._replace(items)
        await self.on_change(list(self.services.values()))
        self.watch = ResumableWatch(self.kv, PREFIX, self._on_event, self._on_relist)
        self._task = asyncio.create_task(self.watch.run(revision + 1), name="watch services")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

    async def create(self, service: Service) -> None:
        key = service_key(service.namespace, service.name)
        if not await self.kv.txn([absent(key)], [put(key, service.dumps())]):
            raise ServiceExists(f"service {service.key} already exists in the cluster")

    async def delete(self, namespace: str, name: str) -> bool:
        return await self.kv.delete(service_key(namespace, name))

    def _take(self, key: str, value: str) -> None:
        try:
            svc = Service.loads(value)
        except ServiceError as exc:
            self.rejected[key] = str(exc)
            log.error("etcd key %s: not a service record: %s", key, exc)
            return
        self.rejected.pop(key, None)
        self.services[svc.key] = svc

    def _replace(self, items: list[Item]) -> None:
        self.services = {}
        for item in items:
            self._take(item.key, item.value)

    async def _on_event(self, ev: WatchEvent) -> None:
        if ev.kind == "delete":
            self.rejected.pop(ev.key, None)
            self.services.pop(ev.key.removeprefix(PREFIX), None)
        else:
            self._take(ev.key, ev.value)
        await self.on_change(list(self.services.values()))

    async def _on_relist(self, items: list[Item]) -> None:
        self._replace(items)
        await self.on_change(list(self.services.values()))
