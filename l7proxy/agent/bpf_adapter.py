"""The BPF adapter: the agent's datapath calls on top of redirect_bpf.Datapath.

Programs and maps are pinned under the pin directory, so a restarted agent re-opens them and the
kernel keeps enforcing in between. Endpoint ids (the key of each endpoint's policy entries) are
kept in the agent's store so they stay the same across restarts.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
from collections.abc import Callable
from pathlib import Path

from redirect_bpf.cluster_sink import ClusterDatapath
from redirect_bpf.datapath import Datapath
from redirect_bpf.loader import pin_dir_for

CT_GC_INTERVAL = 10.0  # seconds; the shortest lifetime, a closing TCP flow's, is 10 s


class BpfDatapath:
    name = "bpf"

    def __init__(self, pin_dir: str | None, host_routing: str = "bpf") -> None:
        self.pin_dir = Path(pin_dir) if pin_dir else pin_dir_for("default")
        self.dp = Datapath(self.pin_dir)
        self.dp.set_host_routing(host_routing == "bpf")
        self.reader = None
        self.ids: dict[str, int] = {}
        self.labels_of: Callable[[int], list[str]] = lambda identity: []
        self.error: str | None = None

    def start(self, emit: Callable[[dict], None]) -> None:
        self.reader = self.dp.events(on_flow=emit, labels_of=lambda i: self.labels_of(i))
        # Expired flows leave conntrack (the programs only set the expiry; LRU eviction alone
        # would keep a closed flow's entry until the map fills)
        self.dp.start_gc(CT_GC_INTERVAL)

    def endpoint_added(
        self, name: str, host_if: str, ip: str, identity: int, ip6: str = ""
    ) -> None:
        self.dp.attach_endpoint(host_if, self.ids[name], identity, ip or None, ip6 or None)

    def endpoint_removed(self, name: str, host_if: str, ip: str, ip6: str = "") -> None:
        try:
            self.dp.detach_endpoint(host_if)
        except (LookupError, OSError):  # the veth is gone (a container's namespace with it)
            self.dp.forget_endpoint(ip or ip6)
        if ip:
            self.dp.ipcache_delete(f"{ip}/32")
        if ip6:
            self.dp.ipcache_delete(f"{ip6}/128")

    def apply(self, compiled, ipcache_entries: dict[str, int], proxy_ports: dict[int, int]) -> None:
        self.dp.ipcache_sync(ipcache_entries)
        ids = {name: ep_id for name, ep_id in self.ids.items() if name in compiled.endpoints}
        self.last_sync = self.dp.sync(compiled, ids, proxy_ports)

    def cluster_sink(
        self, routing: str, cluster_cidr: str, underlay_ip: str, cluster_cidr6: str = ""
    ) -> ClusterDatapath:
        """Cluster mode: the sink that writes other nodes and their pods into the maps and
        routes, after making this node's VXLAN device or underlay hook (redirect_bpf/overlay.py)."""
        sink = ClusterDatapath(
            self.dp,
            routing=routing,
            cluster_cidr=cluster_cidr,
            underlay_ip=underlay_ip,
            cluster_cidr6=cluster_cidr6,
        )
        # pyroute2 cannot run netlink on the agent's (running) event loop thread: a worker does it
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(sink.setup).result()
        return sink

    def ipcache_upsert(self, cidr: str, identity: int) -> None:
        """One entry, no full sync: a learned IP whose identity the maps already know."""
        self.dp.ipcache_upsert(cidr, identity)

    def status(self) -> dict:
        attached = len(self.dp.endpoints())
        how = "re-opened pins" if self.dp.reused else "loaded"
        routing = "bpf" if self.dp.host_routing() else "legacy"
        return {
            "state": "ok",
            "detail": f"{how} at {self.pin_dir}, {attached} endpoints attached, "
            f"host routing {routing}",
        }

    def counters(self) -> dict:
        return self.dp.counters()

    def close(self) -> None:
        if self.reader is not None:
            with contextlib.suppress(Exception):
                self.reader.stop()
        self.dp.close()  # the programs keep enforcing while the agent is away
