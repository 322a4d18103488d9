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
import time
from dataclasses import dataclass, field
from pathlib import Path

import policies
from l7proxy.agent import netdev, policy_repo
from l7proxy.agent.api import ApiError, ApiServer
from l7proxy.agent.datapath import make_datapath
from l7proxy.agent.flowlog import FlowFilter, FlowLog
from l7proxy.agent.ipam import IPPool
from l7proxy.agent.store import EndpointRow, Store
from l7proxy.agent.telemetry import AgentMetrics

log = logging.getLogger("l7proxy.agent")

NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"


@dataclass
class AgentConfig:
    state_dir: Path = Path("/var/lib/l7proxy")
    socket: Path = Path("/var/run/l7proxy/agent.sock")
    pool: str = "10.200.0.0/16"
    netns_prefix: str = ""
    mode: str = "node"
    admin: tuple[str, int] | None = None
    bpf: bool = True
    bpf_dir: str | None = None
    flow_capacity: int = 10_000
    extra: dict = field(default_factory=dict)


def normalize_labels(text: str | list[str]) -> list[str]:
    """`org=empire,class=x` -> sorted `k8s:` labels plus the default namespace label."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        label = policies.parse_labels(item)
        for lb in label:
            source = lb.source if lb.source not in ("", "unspec", "any") else "k8s"
            out.add(f"{source}:{lb.key}={lb.value}" if lb.value else f"{source}:{lb.key}")
    if not any(lb.startswith(NAMESPACE_LABEL + "=") for lb in out):
        out.add(f"{NAMESPACE_LABEL}=default")
    return sorted(out)


def labelset(labels) -> policies.LabelSet:
    return policies.parse_labels(",".join(labels))


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = Store(config.state_dir / "state.db")
        self.pool = IPPool(config.pool)
        self.allocator = policies.IdentityAllocator(self.store.get("identities"))
        self.ipcache = policies.IPCache()
        self.ipcache.upsert(f"{self.pool.router}/32", policies.HOST)
        self.flows = FlowLog(config.flow_capacity)
        self.metrics = AgentMetrics(self)
        self.flows.add_enricher(self._enrich)
        self.flows.add_observer(self.metrics.count_flow)
        self.datapath = make_datapath(config.bpf, config.bpf_dir)
        self.compiled = None
        self.proxy = None  # the node or sidecar proxy workers, once started
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

    # life cycle

    async def start(self) -> None:
        netdev.enable_forwarding()
        await asyncio.to_thread(self._restore_endpoints)
        self.datapath.start(self._emit_threadsafe(asyncio.get_running_loop()))
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
        await self.api.start(self.config.socket)
        if self.config.admin:
            await self._start_admin(*self.config.admin)
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
        if self.admin is not None:
            await self.map_service.close()
            await self.admin.close()
        if self.proxy is not None:
            await self.proxy.close()
        self.datapath.close()
        self.store.close()
        with contextlib.suppress(FileNotFoundError):
            self.config.socket.unlink()

    def _restore_endpoints(self) -> None:
        for ep in self.store.endpoints():
            if not (netdev.netns_exists(ep.netns) and netdev.link_exists(ep.host_if)):
                # A reboot took the namespace away: rebuild its plumbing with the same address.
                netdev.delete(ep.netns, ep.host_if)
                netdev.create(ep.netns, ep.host_if, ep.ip, ep.prefixlen, self.pool.router)
            self._index(ep)
            self._endpoint_id(ep.name)
            self.datapath.endpoint_added(ep.name, ep.host_if, ep.ip, ep.identity)

    def _endpoint_id(self, name: str) -> int:
        if name not in self.endpoint_ids:
            self.endpoint_ids[name] = max(self.endpoint_ids.values(), default=0) + 1
            self.store.put("endpoint_ids", self.endpoint_ids)
        return self.endpoint_ids[name]

    def _labels_of(self, identity: int) -> list[str]:
        labels = self.allocator.labels_of(identity)
        return [str(lb) for lb in labels] if labels is not None else []

    def peer(self, ip: str) -> tuple[int, list[str], str | None]:
        """(identity, labels, endpoint name or None) of an address, as the ipcache sees it."""
        ep = self._by_ip.get(ip)
        if ep is not None:
            return ep.identity, list(ep.labels), ep.name
        identity = self.ipcache.lookup(ip)
        return identity, self._labels_of(identity), None

    def _index(self, ep: EndpointRow) -> None:
        self._by_ip[ep.ip] = ep
        self.ipcache.upsert(f"{ep.ip}/32", ep.identity)

    # policy compile: one CompiledPolicy for everything, handed to datapath and proxy

    def _recompile(self, revision: int, docs=None) -> object:
        docs = self.store.policies() if docs is None else docs
        rules = policy_repo.load_rules(docs)
        return self._compile_rules(rules, revision)

    def _compile_rules(self, rules, revision: int):
        endpoints = {ep.name: labelset(ep.labels) for ep in self.store.endpoints()}
        compiled = policies.compile_policy(rules, endpoints, self.allocator, self.ipcache, revision)
        return compiled

    def _install(self, compiled) -> None:
        old, self.compiled = self.compiled, compiled
        self.policy_error = None
        self.store.put("identities", self.allocator.to_state())
        # No proxy: no ports, and the datapath drops redirected flows ("no proxy"), fail-closed.
        ports = self.proxy.l7_ports(compiled) if self.proxy is not None else {}
        self.datapath.apply(compiled, self._ipcache_entries(), ports)
        if self.proxy is not None:
            self.proxy.update(compiled, old)

    def _ipcache_entries(self) -> dict[str, int]:
        """Endpoints, CIDR identities from the policy, and the node's router address as host."""
        entries = {
            str(cidr): int(identity) for cidr, identity in self.ipcache.items() if ":" not in cidr
        }
        entries[f"{self.pool.router}/32"] = policies.HOST
        entries.update({f"{ip}/32": ep.identity for ip, ep in self._by_ip.items()})
        return entries

    # operations

    def _register_ops(self) -> None:
        api = self.api
        api.op("status", self.op_status)
        api.op("endpoint.create", self.op_endpoint_create)
        api.op("endpoint.list", self.op_endpoint_list)
        api.op("endpoint.delete", self.op_endpoint_delete)
        api.op("identity.list", self.op_identity_list)
        api.op("policy.import", self.op_policy_import)
        api.op("policy.get", self.op_policy_get)
        api.op("policy.delete", self.op_policy_delete)
        api.op("policy.live", self.op_policy_live)
        api.op("metrics", self.op_metrics)
        api.op("observe", self.op_observe)
        api.stream("observe.follow", self.stream_observe)

    async def op_status(self, args: dict) -> dict:
        return self.status()

    def status(self) -> dict:
        eps = self.store.endpoints()
        proxy = (
            self.proxy.status()
            if self.proxy is not None
            else {
                "state": "not running",
                "detail": "sidecar mode needs the BPF datapath"
                if self.config.mode == "sidecar"
                else "no proxy workers",
            }
        )
        return {
            "mode": self.config.mode,
            "uptime_s": round(time.time() - self.started, 1),
            "state_dir": str(self.config.state_dir),
            "pool": str(self.pool.network),
            "router": self.pool.router,
            "parts": {
                "store": {"state": "ok", "detail": str(self.store.path)},
                "policy": {
                    "state": "error" if self.policy_error else "ok",
                    "detail": self.policy_error or f"revision {self.store.revision()} in force",
                },
                "api": {"state": "ok", "detail": str(self.config.socket)},
                "datapath": self.datapath.status(),
                "proxy": proxy,
                "admin": {
                    "state": "ok" if self.admin_addr else "off",
                    "detail": f"{self.admin_addr[0]}:{self.admin_addr[1]}"
                    if self.admin_addr
                    else "",
                },
            },
            "counts": {
                "endpoints": len(eps),
                "identities": len(self.identities()),
                "policies": len(self.store.policies()),
                "flows": self.flows.total,
            },
            "policy_revision": self.store.revision(),
        }

    async def op_endpoint_create(self, args: dict) -> dict:
        name = str(args.get("name") or "")
        if not name or "/" in name or len(name) > 200:
            raise ApiError(f"bad endpoint name {name!r}")
        labels = normalize_labels(args.get("labels") or "")
        async with self._lock:
            if self.store.endpoint(name):
                raise ApiError(f"endpoint {name} already exists")
            used = [ep.ip for ep in self.store.endpoints()]
            if args.get("ip"):
                ip, _, plen = str(args["ip"]).partition("/")
                ip = self.pool.validate(ip, used)
                prefixlen = int(plen or 32)
            else:
                ip, prefixlen = self.pool.allocate(used), 32
            netns_name = self.config.netns_prefix + name
            host_if = netdev.host_ifname(netns_name)
            identity = self.allocator.allocate(labelset(labels))
            row = EndpointRow(
                name, netns_name, host_if, ip, prefixlen, tuple(labels), identity, time.time()
            )
            await asyncio.to_thread(
                netdev.create, netns_name, host_if, ip, prefixlen, self.pool.router
            )
            try:
                self.store.add_endpoint(row, self.allocator.to_state())
                self._index(row)
                self._endpoint_id(name)
                # Datapath calls run in threads: pyroute2 cannot share the agent's uvloop.
                await asyncio.to_thread(self.datapath.endpoint_added, name, host_if, ip, identity)
                if hasattr(self.proxy, "endpoint_added"):
                    await self.proxy.endpoint_added(row)
                compiled = await asyncio.to_thread(self._recompile, self.store.revision())
                await asyncio.to_thread(self._install, compiled)
            except BaseException:
                self.store.delete_endpoint(name)
                self._by_ip.pop(ip, None)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.datapath.endpoint_removed, name, host_if, ip)
                await asyncio.to_thread(netdev.delete, netns_name, host_if)
                raise
        return row.to_json()

    async def op_endpoint_list(self, args: dict) -> list[dict]:
        out = []
        for ep in self.store.endpoints():
            item = ep.to_json()
            item["policy"] = self._enforcement(ep.name)
            if self.config.mode == "sidecar":
                from l7proxy.agent.sidecar import cgroup_path

                item["cgroup"] = str(cgroup_path(ep.netns))
            out.append(item)
        return out

    def _enforcement(self, name: str) -> dict:
        ep = (self.compiled.endpoints.get(name) if self.compiled is not None else None) or None
        if ep is None:
            return {"ingress": False, "egress": False}
        return {"ingress": bool(ep.ingress_enforced), "egress": bool(ep.egress_enforced)}

    async def op_endpoint_delete(self, args: dict) -> dict:
        name = str(args.get("name") or "")
        async with self._lock:
            ep = self.store.endpoint(name)
            if ep is None:
                raise ApiError(f"no endpoint named {name}")
            if hasattr(self.proxy, "endpoint_removed"):
                await self.proxy.endpoint_removed(ep)
            await asyncio.to_thread(self.datapath.endpoint_removed, ep.name, ep.host_if, ep.ip)
            await asyncio.to_thread(netdev.delete, ep.netns, ep.host_if)
            self.store.delete_endpoint(name)
            self._by_ip.pop(ep.ip, None)
            self.endpoint_ids.pop(name, None)
            self.store.put("endpoint_ids", self.endpoint_ids)
            self.ipcache = self._rebuild_ipcache()
            compiled = await asyncio.to_thread(self._recompile, self.store.revision())
            await asyncio.to_thread(self._install, compiled)
        return {"deleted": name}

    def _rebuild_ipcache(self):
        cache = policies.IPCache()
        cache.upsert(f"{self.pool.router}/32", policies.HOST)
        for ep in self._by_ip.values():
            cache.upsert(f"{ep.ip}/32", ep.identity)
        return cache

    def identities(self) -> list[dict]:
        """Reserved, endpoint and CIDR identities, with the endpoints that carry each."""
        users: dict[int, list[str]] = {}
        for ep in self.store.endpoints():
            users.setdefault(ep.identity, []).append(ep.name)
        out = []
        for number, labels in sorted(self.allocator.identities().items()):
            out.append(
                {
                    "id": number,
                    "labels": [str(lb) for lb in labels],
                    "endpoints": users.get(number, []),
                }
            )
        return out

    async def op_identity_list(self, args: dict) -> list[dict]:
        return self.identities()

    async def op_policy_import(self, args: dict) -> dict:
        files = args.get("files") or []
        if not files:
            raise ApiError("no policy files given")
        async with self._lock:
            revision = self.store.revision() + 1
            new = []
            for f in files:
                new.extend(policy_repo.split_documents(f["name"], f["text"], revision))
            merged = policy_repo.merge(self.store.policies(), new)
            compiled = await asyncio.to_thread(self._recompile, revision, merged)
            self.store.policy_replace(merged, revision)
            await asyncio.to_thread(self._install, compiled)
        return {"revision": revision, "imported": [d.key for d in new]}

    async def op_policy_get(self, args: dict) -> dict:
        docs = self.store.policies()
        out = policy_repo.to_json(docs, self.store.revision())
        out["yaml"] = policy_repo.render_yaml(docs)
        return out

    async def op_policy_delete(self, args: dict) -> dict:
        async with self._lock:
            current = self.store.policies()
            if args.get("all"):
                keep, gone = [], [d.key for d in current]
            else:
                keep, gone = policy_repo.remove(current, str(args.get("name") or ""))
                if not gone:
                    raise ApiError(f"no policy named {args.get('name')!r}")
            revision = self.store.revision() + 1
            compiled = await asyncio.to_thread(self._recompile, revision, keep)
            self.store.policy_replace(keep, revision)
            await asyncio.to_thread(self._install, compiled)
        return {"revision": revision, "deleted": gone}

    async def op_policy_live(self, args: dict) -> dict:
        """What `policy trace --src-endpoint/--dst-endpoint` needs: the documents and endpoints."""
        return {
            "revision": self.store.revision(),
            "documents": [{"key": d.key, "text": d.text} for d in self.store.policies()],
            "endpoints": {
                ep.name: {"labels": list(ep.labels), "ip": ep.ip, "identity": ep.identity}
                for ep in self.store.endpoints()
            },
        }

    async def op_metrics(self, args: dict) -> str:
        return self.metrics.render()

    async def op_observe(self, args: dict) -> list[dict]:
        flt = FlowFilter.from_json(args.get("filter"))
        last = args.get("last")
        return self.flows.last(int(last) if last is not None else None, flt)

    async def stream_observe(self, args: dict):
        flt = FlowFilter.from_json(args.get("filter"))
        last = args.get("last")
        queue = self.flows.subscribe(flt)
        try:
            for flow in self.flows.last(int(last) if last is not None else 0, flt):
                yield {"flow": flow}
            while True:
                yield {"flow": await queue.get()}
        finally:
            self.flows.unsubscribe(queue)

    # flows

    def _emit_threadsafe(self, loop: asyncio.AbstractEventLoop):
        def emit(flow: dict) -> None:
            loop.call_soon_threadsafe(self.flows.ingest, flow)

        return emit

    def _enrich(self, flow: dict) -> None:
        for side in ("source", "destination"):
            peer = flow.get(side)
            if not isinstance(peer, dict):
                continue
            ep = self._by_ip.get(peer.get("ip") or "")
            if ep is not None:
                peer.setdefault("pod_name", ep.name)
                peer.setdefault("namespace", "default")
                if not peer.get("labels"):
                    peer["labels"] = list(ep.labels)
                if not peer.get("identity"):
                    peer["identity"] = ep.identity

    # proxy and admin

    async def _start_proxy(self) -> None:
        try:
            from l7proxy.agent.proxy_workers import start_proxy
        except ImportError:
            return
        self.proxy = await start_proxy(self)

    async def _start_admin(self, host: str, port: int) -> None:
        from l7proxy.admin import AdminRequest, AdminResponse, AdminServer, install_core_routes

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
        from l7proxy.depmap import mount

        self.map_service = mount(self.admin, self.flows)  # /map, /map.json, /map/events
        self.admin_addr = await self.admin.start(host, port)
