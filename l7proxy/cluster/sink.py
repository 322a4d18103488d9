"""The only way the cluster layer drives the datapath: what other nodes and their pods are.

`ClusterSink` is implemented over the BPF maps by the datapath (tunnel endpoints in the ipcache,
a nodes map, routes); `RecordingSink` keeps the calls for the agent without BPF and for tests.
Calls come from a worker thread, one at a time, and only for other nodes (never this one).
"""

from __future__ import annotations

import threading
from typing import Protocol


class ClusterSink(Protocol):
    def node_up(
        self,
        name: str,
        underlay_ip: str,
        pod_cidr: str,
        pod_cidr6: str = "",
        underlay_ip6: str = "",
    ) -> None: ...
    def node_down(self, name: str) -> None: ...
    def ipcache_set(self, cidr: str, identity: int, node_underlay_ip: str | None) -> None: ...
    def ipcache_delete(self, cidr: str) -> None: ...


class RecordingSink:
    """Remembers the current remote state and every call, in order."""

    def __init__(self) -> None:
        self.nodes: dict[str, tuple[str, ...]] = {}
        self.ipcache: dict[str, tuple[int, str | None]] = {}
        self.calls: list[tuple] = []
        self._lock = threading.Lock()

    def node_up(
        self,
        name: str,
        underlay_ip: str,
        pod_cidr: str,
        pod_cidr6: str = "",
        underlay_ip6: str = "",
    ) -> None:
        with self._lock:
            # a single-stack node records what it did before dual stack existed
            extra = (pod_cidr6, underlay_ip6) if pod_cidr6 or underlay_ip6 else ()
            self.nodes[name] = (underlay_ip, pod_cidr, *extra)
            self.calls.append(("node_up", name, underlay_ip, pod_cidr, *extra))

    def node_down(self, name: str) -> None:
        with self._lock:
            self.nodes.pop(name, None)
            self.calls.append(("node_down", name))

    def ipcache_set(self, cidr: str, identity: int, node_underlay_ip: str | None) -> None:
        with self._lock:
            self.ipcache[cidr] = (identity, node_underlay_ip)
            self.calls.append(("ipcache_set", cidr, identity, node_underlay_ip))

    def ipcache_delete(self, cidr: str) -> None:
        with self._lock:
            self.ipcache.pop(cidr, None)
            self.calls.append(("ipcache_delete", cidr))

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "nodes": {n: list(v) for n, v in sorted(self.nodes.items())},
                "ipcache": {c: list(v) for c, v in sorted(self.ipcache.items())},
            }
