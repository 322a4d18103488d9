"""The node's service table in the agent's SQLite state (the store's key-value table, key
`services`): on a single node it is the source of truth; in cluster mode it is the cache of
etcd's services, so a restarted agent translates VIPs before it reaches etcd (or while etcd is
down)."""

from __future__ import annotations

from l7proxy.services.model import Service, ServiceError

STORE_KEY = "services"  # {"namespace/name": service JSON}


class ServiceTable:
    def __init__(self, store) -> None:
        self._store = store
        self._services: dict[str, Service] = {}
        for key, obj in (store.get(STORE_KEY, {}) or {}).items():
            try:
                self._services[key] = Service.from_json(obj)
            except ServiceError:
                continue  # written by a newer agent with fields this one rejects: skip

    def all(self) -> list[Service]:
        return [self._services[k] for k in sorted(self._services)]

    def get(self, key: str) -> Service | None:
        return self._services.get(key)

    def by_frontend(self, vip: str, port: int, protocol: str) -> Service | None:
        for svc in self._services.values():
            if (svc.vip, svc.port, svc.protocol) == (vip, port, protocol):
                return svc
        return None

    def put(self, service: Service) -> None:
        self._services[service.key] = service
        self._save()

    def delete(self, key: str) -> bool:
        gone = self._services.pop(key, None) is not None
        if gone:
            self._save()
        return gone

    def replace(self, services: list[Service]) -> bool:
        """Make the table equal to `services` (an etcd re-list); True if anything changed."""
        new = {s.key: s for s in services}
        if new == self._services:
            return False
        self._services = new
        self._save()
        return True

    def _save(self) -> None:
        self._store.put(STORE_KEY, {k: s.to_json() for k, s in self._services.items()})
