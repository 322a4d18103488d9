"""The agent's embedded store: one SQLite file under the state directory.

Endpoints, the identity allocator's state, the IP pool and the policy repository live here, so a
restarted agent keeps every identity and endpoint it had. Endpoints' named ports live in the
key-value table (`endpoint_ports`), so a state directory made before they existed opens as is;
so do dual-stack endpoints' IPv6 addresses (`endpoint_ipv6`).
Each public method is one transaction; `policy_replace` swaps the whole policy set and bumps the
revision in the same transaction, which is what makes `policy import` atomic.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from l7proxy.agent.ports import NamedPort

SCHEMA = """
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY,
    netns TEXT NOT NULL,
    host_if TEXT NOT NULL,
    ip TEXT NOT NULL,
    prefixlen INTEGER NOT NULL,
    labels TEXT NOT NULL,
    identity INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (
    key TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    namespace TEXT NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    revision INTEGER NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class EndpointRow:
    name: str
    netns: str
    host_if: str
    ip: str
    prefixlen: int
    labels: tuple[str, ...]
    identity: int
    created: float
    ports: tuple[NamedPort, ...] = ()  # named ports, sorted by name
    container_id: str = ""  # set for a container's namespace adopted through CNI
    runtime: str = ""  # "podman", "cni", ...: who owns the namespace (empty: the agent)
    ifname: str = ""  # the interface name inside the container (CNI_IFNAME)
    ip6: str = ""  # the IPv6 address of a dual-stack endpoint (the agent's --pool6), else ""

    @property
    def adopted(self) -> bool:
        """The namespace belongs to a container runtime: `netns` is its path, not a name."""
        return bool(self.container_id)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "netns": self.netns,
            "host_if": self.host_if,
            "ip": self.ip,
            "prefixlen": self.prefixlen,
            "labels": list(self.labels),
            "identity": self.identity,
            "created": self.created,
            "ports": [p.to_json() for p in self.ports],
            "container_id": self.container_id,
            "runtime": self.runtime,
            "ifname": self.ifname,
            "ip6": self.ip6,
        }


@dataclass(frozen=True, slots=True)
class PolicyDoc:
    key: str  # "namespace/name" (clusterwide policies use an empty namespace)
    name: str
    namespace: str
    source: str  # the file it came from, for `policy get`
    text: str  # one YAML/JSON document, unchanged
    revision: int  # the revision that imported it


PORTS_KEY = "endpoint_ports"  # {endpoint name: [{"name", "port", "protocol"}, ...]}
CONTAINERS_KEY = "endpoint_containers"  # {endpoint name: [container id, runtime, ifname]}
IPV6_KEY = "endpoint_ipv6"  # {endpoint name: IPv6 address}


class Store:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # The agent calls the store from worker threads (netlink work runs off the loop) but
        # always under its own lock, so one connection shared across threads is safe.
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.RLock()

    def close(self) -> None:
        self._db.close()

    # key/value: identity allocator state, policy revision, counters

    def get(self, key: str, default=None):
        row = self._db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def put(self, key: str, value) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO kv(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, json.dumps(value, sort_keys=True)),
            )

    # endpoints

    def endpoints(self) -> list[EndpointRow]:
        rows = self._db.execute(
            "SELECT name, netns, host_if, ip, prefixlen, labels, identity, created "
            "FROM endpoints ORDER BY name"
        ).fetchall()
        ports, containers = self._ports(), self.get(CONTAINERS_KEY, {})
        ipv6 = self.get(IPV6_KEY, {})
        return [_endpoint(row, ports, containers, ipv6) for row in rows]

    def endpoint(self, name: str) -> EndpointRow | None:
        row = self._db.execute(
            "SELECT name, netns, host_if, ip, prefixlen, labels, identity, created "
            "FROM endpoints WHERE name = ?",
            (name,),
        ).fetchone()
        if not row:
            return None
        return _endpoint(row, self._ports(), self.get(CONTAINERS_KEY, {}), self.get(IPV6_KEY, {}))

    def add_endpoint(self, ep: EndpointRow, identity_state: dict) -> None:
        """Store the endpoint, its named ports and the allocator state that gave it its
        identity, together."""
        with self._lock, self._tx():
            self._db.execute(
                "INSERT INTO endpoints VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ep.name,
                    ep.netns,
                    ep.host_if,
                    ep.ip,
                    ep.prefixlen,
                    json.dumps(list(ep.labels)),
                    ep.identity,
                    ep.created,
                ),
            )
            self._put_raw("identities", identity_state)
            ports = self.get(PORTS_KEY, {})
            ports.pop(ep.name, None)  # left by an older agent's delete of this name
            if ep.ports:
                ports[ep.name] = [p.to_json() for p in ep.ports]
            self._put_raw(PORTS_KEY, ports)
            containers = self.get(CONTAINERS_KEY, {})
            containers.pop(ep.name, None)
            if ep.adopted:
                containers[ep.name] = [ep.container_id, ep.runtime, ep.ifname]
            self._put_raw(CONTAINERS_KEY, containers)
            ipv6 = self.get(IPV6_KEY, {})
            ipv6.pop(ep.name, None)
            if ep.ip6:
                ipv6[ep.name] = ep.ip6
            self._put_raw(IPV6_KEY, ipv6)

    def delete_endpoint(self, name: str) -> None:
        with self._lock, self._tx():
            self._db.execute("DELETE FROM endpoints WHERE name = ?", (name,))
            ports = self.get(PORTS_KEY, {})
            if ports.pop(name, None) is not None:
                self._put_raw(PORTS_KEY, ports)
            containers = self.get(CONTAINERS_KEY, {})
            if containers.pop(name, None) is not None:
                self._put_raw(CONTAINERS_KEY, containers)
            ipv6 = self.get(IPV6_KEY, {})
            if ipv6.pop(name, None) is not None:
                self._put_raw(IPV6_KEY, ipv6)

    def _ports(self) -> dict[str, tuple[NamedPort, ...]]:
        return {
            name: tuple(NamedPort(p["name"], int(p["port"]), p["protocol"]) for p in items)
            for name, items in self.get(PORTS_KEY, {}).items()
        }

    # policy repository

    def policies(self) -> list[PolicyDoc]:
        rows = self._db.execute(
            "SELECT key, name, namespace, source, text, revision FROM policies ORDER BY key"
        ).fetchall()
        return [PolicyDoc(*row) for row in rows]

    def revision(self) -> int:
        return int(self.get("policy_revision", 0))

    def policy_replace(self, docs: list[PolicyDoc], revision: int) -> None:
        """Replace the whole policy set and set the revision in one transaction."""
        with self._lock, self._tx():
            self._db.execute("DELETE FROM policies")
            self._db.executemany(
                "INSERT INTO policies VALUES (?, ?, ?, ?, ?, ?)",
                [(d.key, d.name, d.namespace, d.source, d.text, d.revision) for d in docs],
            )
            self._put_raw("policy_revision", revision)
            changes = int(self.get("policy_change_total", 0)) + 1
            self._put_raw("policy_change_total", changes)

    # helpers

    def _put_raw(self, key: str, value) -> None:
        self._db.execute(
            "INSERT INTO kv(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value, sort_keys=True)),
        )

    def _tx(self):
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        return False


def _endpoint(
    row, ports: dict[str, tuple[NamedPort, ...]], containers: dict, ipv6: dict
) -> EndpointRow:
    name, netns, host_if, ip, prefixlen, labels, identity, created = row
    container_id, runtime, ifname = containers.get(name) or ("", "", "")
    return EndpointRow(
        name,
        netns,
        host_if,
        ip,
        prefixlen,
        tuple(json.loads(labels)),
        identity,
        created,
        ports.get(name, ()),
        container_id,
        runtime,
        ifname,
        ipv6.get(name, ""),
    )
