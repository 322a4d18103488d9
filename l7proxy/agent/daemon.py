"""The node agent: endpoints, identities, the policy repository, the datapath and the proxy.

Every mutation takes the agent lock, does its netlink or compile work in a worker thread, stores
the result, and then recompiles the policy for the new endpoint and rule set and hands it to the
datapath and the proxy. Reads (list, status, observe) never take the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import policies
from l7proxy.admin import AdminRequest, AdminResponse, AdminServer, install_core_routes
from l7proxy.agent import netdev, policy_repo, ports
from l7proxy.agent.api import ApiError, ApiServer
from l7proxy.agent.container_ops import ContainerOps
from l7proxy.agent.datapath_choice import make_datapath
from l7proxy.agent.dns_proxy import DnsProxy
from l7proxy.agent.flowlog import FlowLog
from l7proxy.agent.fqdn_learning import FqdnLearning
from l7proxy.agent.ipam import IPPool
from l7proxy.agent.node_proxy import NodeProxy
from l7proxy.agent.ops import AgentOps, labelset
from l7proxy.agent.proxy_worker_control import WorkerHandle
from l7proxy.agent.sidecar_proxy import SidecarProxy
from l7proxy.agent.store import EndpointRow, Store
from l7proxy.agent.telemetry import AgentMetrics
from l7proxy.agent.timewait import TimeWaitReaper
from l7proxy.cluster.agent_mode import ClusterMode, default_underlay_ip
from l7proxy.cluster.ipam import in_cluster
from l7proxy.config import ProxyConfig
from l7proxy.depmap import mount
from l7proxy.services.lb_adapter import DEFAULT_CGROUP
from l7proxy.services.ops import ServiceOps

log = logging.getLogger("l7proxy.agent")


@dataclass
class AgentConfig:
    state_dir: Path = Path("/var/lib/l7proxy")
    socket: Path = Path("/var/run/l7proxy/agent.sock")
    pool: str = "10.200.0.0/16"
    pool6: str = ""  # an IPv6 CIDR: every endpoint is dual stack (ipam.DEFAULT_POOL6); "" = off
    netns_prefix: str = ""
    mode: str = "node"
    admin: tuple[str, int] | None = None
    bpf: bool = True
    bpf_dir: str | None = None
    host_routing: str = "bpf"  # "legacy": pod to pod through the host's forwarding path
    flow_capacity: int = 10_000
    proxy_worker: str = "inline"  # or "process": the node proxy outlives agent restarts
    path_escaped_slashes: str = "unescape"  # ProxyConfig.path_escaped_slashes (issue 19)
    dns_min_ttl: float = 0  # ProxyConfig.dns_* (issue 21, docs/dns.md)
    dns_max_ips_per_name: int = 1000
    dns_nice: int = -10
    # cluster mode (issue 15): all of these matter only with kvstore set (docs/cluster.md)
    kvstore: str | None = None  # etcd://HOST:PORT[,HOST:PORT...]
    node_name: str = ""
    cluster_cidr: str = ""
    node_cidr_mask_size: int = 24
    cluster_cidr6: str = ""  # dual stack: each node also leases an IPv6 pod CIDR from this
    node_cidr_mask_size6: int = 64
    underlay_ip6: str = ""  # next hop for IPv6 pods in native routing (default: the underlay
    #                         device's global IPv6 address, if any)
    routing: str = "tunnel"  # or "native"
    underlay_ip: str = ""  # default: the source address towards the first etcd endpoint
    node_lease_ttl: int = 15  # seconds
    identity_gc_interval: float = 60.0  # seconds between identity GC rounds
    # services (issue 16): the cgroup v2 directory the socket LB attaches to ('' = off)
    sock_lb_cgroup: str = DEFAULT_CGROUP


class Agent(AgentOps, ContainerOps, ClusterMode, FqdnLearning, ServiceOps):
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = Store(config.state_dir / "state.db")
        self.proxy_config = ProxyConfig(
            path_escaped_slashes=config.path_escaped_slashes,
            dns_min_ttl=config.dns_min_ttl,
            dns_max_ips_per_name=config.dns_max_ips_per_name,
            dns_nice=config.dns_nice,
        )
        self.pool = IPPool(config.pool)
        self.pool6 = IPPool(config.pool6, 6) if config.pool6 else None
        self.allocator = policies.IdentityAllocator(self.store.get("identities"))
        self.ipcache = policies.IPCache()
        self.ipcache.upsert(f"{self.pool.router}/32", policies.HOST)
        if self.pool6 is not None:
            self.ipcache.upsert(f"{self.pool6.router}/128", policies.HOST)
        self.node_label = config.node_name or socket.gethostname()
        self.flows = FlowLog(config.flow_capacity)
        self.metrics = AgentMetrics(self)
        self.flows.add_enricher(self._enrich)
        self.flows.add_observer(self.metrics.count_flow, l7=False)  # (L7 counted by the proxy)
        self.datapath = make_datapath(config.bpf, config.bpf_dir, config.host_routing)
        self.compiled = None
        self.proxy = None  # the node or sidecar proxy workers, once started
        self.timewait: TimeWaitReaper | None = None  # node mode: see agent/timewait.py
        self.dns_proxy: DnsProxy | None = None  # node mode: rules.dns and toFQDNs learning
        self._init_fqdn(self.proxy_config.dns_min_ttl, self.proxy_config.dns_max_ips_per_name)
        self.api = ApiServer()
        self.admin = None
        self.admin_addr: tuple[str, int] | None = None
        self.started = time.time()
        self._lock = asyncio.Lock()
        self._by_ip: dict[str, EndpointRow] = {}
        # Endpoint ids key each endpoint's entries in the BPF policy maps; stable across restarts.
        self.endpoint_ids: dict[str, int] = dict(self.store.get("endpoint_ids", {}))
        if hasattr(self.datapath, "ids"):
            self.datapath.ids = self.endpoint_ids
            self.datapath.labels_of = self._labels_of
        self._stopping = asyncio.Event()
        self.policy_error: str | None = None

    def _cluster_sink_default(self):
        # cluster datapath hook: with BPF, other nodes and their pods go into the maps and routes
        if not hasattr(self.datapath, "cluster_sink"):
            return super()._cluster_sink_default()
        c = self.config
        underlay = c.underlay_ip or default_underlay_ip(c.kvstore)
        return self.datapath.cluster_sink(c.routing, c.cluster_cidr, underlay, c.cluster_cidr6)

    # life cycle

    async def start(self) -> None:
        netdev.enable_forwarding(ipv6=self.pool6 is not None or bool(self.config.cluster_cidr6))
        if self.config.kvstore:
            await self._join_cluster()  # the pod CIDR, identities and policy come from etcd
        await asyncio.to_thread(self._restore_endpoints)
        self.datapath.start(self._emit_threadsafe(asyncio.get_running_loop()))
        await asyncio.to_thread(self._start_services)  # VIPs translate before the API opens
        await self._start_proxy()
        try:
            compiled = await asyncio.to_thread(self._recompile, self.store.revision())
        except ApiError as exc:
            # The stored set no longer compiles (an engine upgrade?): leave the kernel's maps as
            # they are, let the proxy fail closed, and say so in status until a new import.
            self.policy_error = f"{exc}: {'; '.join(exc.details)}"
            log.error("stored policy does not compile: %s", self.policy_error)
        else:
            await asyncio.to_thread(self._install, compiled)
        self._register_ops()
        self._register_container_ops()
        self._register_service_ops()
        await self.api.start(self.config.socket)
        if self.config.admin:
            await self._start_admin(*self.config.admin)
        if self.cluster is not None:
            await self._cluster_after_start()
            await self._services_join_cluster()
        log.info("agent ready on %s", self.config.socket)

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        me = os.getpid()

        def on_signal(signum, frame) -> None:
            # pyroute2 forks helpers (netns create, NetNS) that share the loop's wakeup fd; a
            # signal delivered to one of them must not stop the agent, so check the pid here
            # instead of using loop.add_signal_handler (which trusts the wakeup fd).
            if os.getpid() == me:
                loop.call_soon_threadsafe(self._stopping.set)

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        await self.start()
        print(f"l7proxy agent: ready, API on {self.config.socket}", flush=True)
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        """Stop the agent; endpoints, pinned maps and attached programs stay (restart-safe)."""
        await self.api.close()
        self.stop_fqdn_gc()
        if self.dns_proxy is not None:
            await self.dns_proxy.close()
        await self._stop_services()
        if self.cluster is not None:
            await self.cluster.close()
        if self.admin is not None:
            await self.map_service.close()
            await self.admin.close()
        if self.proxy is not None:
            await self.proxy.close()
        if self.timewait is not None:
            self.timewait.stop()
        self.datapath.close()
        self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket.unlink()

    def _restore_endpoints(self) -> None:
        self._reap_dead_containers()  # their runtime owns the namespace: never re-created
        for ep in self.store.endpoints():
            if not ep.adopted and not (
                netdev.netns_exists(ep.netns) and netdev.link_exists(ep.host_if)
            ):
                # A reboot took the namespace away: rebuild its plumbing with the same address.
                netdev.delete(ep.netns, ep.host_if)
                netdev.create(
                    ep.netns, ep.host_if, ep.ip, ep.prefixlen, self.pool.router, *self._v6(ep)
                )
            self._index(ep)
            self._endpoint_id(ep.name)
            self.datapath.endpoint_added(ep.name, ep.host_if, ep.ip, ep.identity, ep.ip6)

    def _v6(self, ep: EndpointRow) -> tuple[str | None, str | None]:
        """(IPv6 address, IPv6 router) for netdev.create, (None, None) for single stack."""
        if not ep.ip6 or self.pool6 is None:
            return None, None
        return ep.ip6, self.pool6.router

    def _endpoint_id(self, name: str) -> int:
        if name not in self.endpoint_ids:
            self.endpoint_ids[name] = max(self.endpoint_ids.values(), default=0) + 1
            self.store.put("endpoint_ids", self.endpoint_ids)
        return self.endpoint_ids[name]

    def _labels_of(self, identity: int) -> list[str]:
        labels = self.allocator.labels_of(identity)
        return [str(lb) for lb in labels] if labels is not None else []

    def upstream_keeps_source(self, src_ip: str, dst_ip: str) -> bool:
        """Cluster mode: the proxy's upstream from a local pod to another node's pod connects
        from the pod's own address, so the far side (its ipcache in native routing, its proxy in
        both) finds the client; from_overlay/from_netdev hand the answers back to the proxy."""
        c = self.config
        if not c.kvstore or src_ip not in self._by_ip:
            return False
        if dst_ip in self._by_ip:
            return False
        return in_cluster(dst_ip, c.cluster_cidr, c.cluster_cidr6)

    def peer(self, ip: str) -> tuple[int, list[str], str | None]:
        """(identity, labels, endpoint name or None) of an address, as the ipcache sees it."""
        ep = self._by_ip.get(ip)
        if ep is not None:
            return ep.identity, list(ep.labels), ep.name
        identity = self.ipcache.lookup(ip)
        return identity, self._labels_of(identity), None

    def _index(self, ep: EndpointRow) -> None:
        if ep.ip:  # "" for an IPv6-only endpoint
            self._by_ip[ep.ip] = ep
            self.ipcache.upsert(f"{ep.ip}/32", ep.identity)
        if ep.ip6:
            self._by_ip[ep.ip6] = ep
            self.ipcache.upsert(f"{ep.ip6}/128", ep.identity)

    # policy compile: one CompiledPolicy for everything, handed to datapath and proxy

    def _recompile(self, revision: int, docs=None) -> object:
        docs = self.store.policies() if docs is None else docs
        rules = policy_repo.load_rules(docs)
        return self._compile_rules(rules, revision)

    def _compile_rules(self, rules, revision: int, previous=None):
        rows = self.store.endpoints()
        endpoints = {ep.name: labelset(ep.labels) for ep in rows}
        # `toPorts: [{port: NAME}]` resolves against these (ingress: the selected endpoint's own,
        # egress: every peer's); the kernel's maps and the proxy both read the result.
        named = ports.table((ep.name, ep.ports) for ep in rows)
        return policies.compile_policy(
            rules,
            endpoints,
            self.allocator,
            self.ipcache,
            revision,
            named_ports=named,
            previous=previous,
            learned=self.fqdn.learned(),
        )

    def _install(self, compiled) -> None:
        old, self.compiled = self.compiled, compiled
        self.policy_error = None
        self.store.put("identities", self.allocator.to_state())
        # No proxy: no ports, and the datapath drops redirected flows ("no proxy"), fail-closed.
        ports = self.proxy.l7_ports(compiled) if self.proxy is not None else {}
        if self.dns_proxy is not None:
            ports.update(self.dns_proxy.l7_ports(compiled))  # DNS rule sets go to the DNS proxy
        self.datapath.apply(compiled, self._ipcache_entries(), ports)
        if self.proxy is not None:
            self.proxy.update(compiled, old)
        self._services_refresh()  # endpoints or the cluster's ipcache may have moved backends

    def _ipcache_entries(self) -> dict[str, int]:
        """Endpoints, CIDR identities from the policy, and the node's router addresses as host
        (IPv4 and IPv6 prefixes; the datapath puts each into its family's map)."""
        entries = {str(cidr): int(identity) for cidr, identity in self.ipcache.items()}
        entries[f"{self.pool.router}/32"] = policies.HOST
        if self.pool6 is not None:
            entries[f"{self.pool6.router}/128"] = policies.HOST
        entries.update(self._cluster_ipcache_entries())  # other nodes' pods (cluster mode)
        entries.update(
            {f"{ip}/{128 if ':' in ip else 32}": ep.identity for ip, ep in self._by_ip.items()}
        )
        return entries

    # flows

    def _emit_threadsafe(self, loop: asyncio.AbstractEventLoop):
        def emit(flow: dict) -> None:
            loop.call_soon_threadsafe(self.flows.ingest, flow)

        return emit

    def _enrich(self, flow: dict) -> None:
        # Hubble's node_name: the cluster node's name, or this host's name on a single node
        flow["node_name"] = self.node_label
        for side in ("source", "destination"):
            peer = flow.get(side)
            if not isinstance(peer, dict) or "pod_name" in peer:
                # (filled already: a proxy shares one peer dict among its connection's flows)
                continue
            ep = self._by_ip.get(peer.get("ip") or "")
            if ep is not None:
                peer.setdefault("pod_name", ep.name)
                peer.setdefault("namespace", _namespace_of(ep.labels))
                if ep.adopted:
                    peer.setdefault("container_id", ep.container_id[:12])
                    peer.setdefault("runtime", ep.runtime)
                if not peer.get("labels"):
                    peer["labels"] = list(ep.labels)
                if not peer.get("identity"):
                    peer["identity"] = ep.identity

    # proxy and admin

    async def _start_proxy(self) -> None:
        """The node proxy inline or as a worker process, or the sidecar proxy (--mode); in node
        mode also the DNS proxy (in the agent: it writes the ipcache before releasing answers)."""
        if self.config.mode == "node" or self.datapath.name == "bpf":
            # sidecar mode too: DNS is redirected by the tc programs, as in node mode
            self.dns_proxy = DnsProxy(self, self.proxy_config)
            await self.dns_proxy.start()
            self.start_fqdn_gc(self.proxy_config.dns_gc_interval)
        if self.config.mode == "node" and self.datapath.name == "bpf":
            self.timewait = TimeWaitReaper(
                on_reaped=self.metrics.timewait_reaped.inc,
                ipv6=self.pool6 is not None or bool(self.config.cluster_cidr6),
            ).start()
        if self.config.mode == "node" and self.config.proxy_worker == "process":
            self.proxy = await WorkerHandle.attach(self)
            return
        proxy_config = self.proxy_config
        if self.config.mode == "sidecar":
            if self.datapath.name != "bpf":
                return  # connect() redirection needs the BPF datapath; status says so
            proxy = SidecarProxy(self, config=proxy_config)
        else:
            proxy = NodeProxy(self, config=proxy_config)
        await proxy.start()
        self.proxy = proxy

    async def _start_admin(self, host: str, port: int) -> None:
        self.admin = AdminServer()

        def policy_info() -> dict:
            return {
                "revision": self.store.revision(),
                "files": sorted({d.source for d in self.store.policies()}),
                "policies": [d.key for d in self.store.policies()],
            }

        install_core_routes(self.admin, self.metrics, policy_info)

        async def status_route(request: AdminRequest) -> AdminResponse:
            return AdminResponse.json(self.status())

        self.admin.add_route("/status", status_route)
        self.map_service = mount(self.admin, self.flows)  # /map, /map.json, /map/events
        self.admin_addr = await self.admin.start(host, port)


def _namespace_of(labels) -> str:
    for label in labels:
        if label.startswith("k8s:io.kubernetes.pod.namespace="):
            return label.partition("=")[2]
    return "default"
