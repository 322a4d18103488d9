"""The agent's API operations: one method per op, registered on the unix-socket API.

Mutations take the agent lock and run netlink and compile work in worker threads (pyroute2 cannot
share the agent's uvloop); reads never take the lock. Mixed into `Agent` (daemon.py), which owns
the state these methods use.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import policies
from l7proxy.agent import netdev, policy_repo, ports
from l7proxy.agent.api import ApiError
from l7proxy.agent.flowlog import FlowFilter
from l7proxy.agent.store import EndpointRow

NAMESPACE_LABEL = "k8s:io.kubernetes.pod.namespace"


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


class AgentOps:
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
        api.op("cluster.info", self.op_cluster_info)
        api.stream("observe.follow", self.stream_observe)
        if hasattr(self.proxy, "follow"):  # the out-of-process node proxy's channels
            api.stream("proxy.state", self.proxy.follow)
            api.sink("proxy.flows", self.proxy.uplink)

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
            "pool6": str(self.pool6.network) if self.pool6 is not None else "",
            "router6": self.pool6.router if self.pool6 is not None else "",
            "parts": {
                "store": {"state": "ok", "detail": str(self.store.path)},
                "policy": {
                    "state": "error" if self.policy_error else "ok",
                    "detail": self.policy_error or f"revision {self.store.revision()} in force",
                },
                "api": {"state": "ok", "detail": str(self.config.socket)},
                "datapath": self.datapath.status(),
                "proxy": proxy,
                "fqdn": self.fqdn_status(),
                "services": self.services_status(),
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
            **({"cluster": self.cluster.status()} if self.cluster is not None else {}),
        }

    async def op_endpoint_create(self, args: dict) -> dict:
        name = str(args.get("name") or "")
        if not name or "/" in name or len(name) > 200:
            raise ApiError(f"bad endpoint name {name!r}")
        labels = normalize_labels(args.get("labels") or "")
        try:
            named = ports.from_json(args.get("ports"))
        except ValueError as exc:
            raise ApiError(str(exc)) from None
        cluster_identity = None
        if self.cluster is not None:  # may wait for etcd (new labels): outside the lock
            if self.store.endpoint(name):
                raise ApiError(f"endpoint {name} already exists")
            cluster_identity = await self._cluster_identity(labels)
        async with self._lock:
            if self.store.endpoint(name):
                raise ApiError(f"endpoint {name} already exists")
            used = [ep.ip for ep in self.store.endpoints()]
            if args.get("ipv6_only"):
                ip, prefixlen = self._ipv6_only(args), 0
            elif args.get("ip"):
                ip, _, plen = str(args["ip"]).partition("/")
                ip = self.pool.validate(ip, used)
                prefixlen = int(plen or 32)
            else:
                ip, prefixlen = self.pool.allocate(used), 32
            ip6 = self._allocate_ip6(args.get("ip6"))
            netns_name = self.config.netns_prefix + name
            host_if = netdev.host_ifname(netns_name)
            identity = cluster_identity or self.allocator.allocate(labelset(labels))
            row = EndpointRow(
                name,
                netns_name,
                host_if,
                ip,
                prefixlen,
                tuple(labels),
                identity,
                time.time(),
                named,
                ip6=ip6,
            )
            await asyncio.to_thread(
                netdev.create,
                netns_name,
                host_if,
                ip,
                prefixlen,
                self.pool.router,
                *self._v6(row),
            )
            await self._register(row, lambda: netdev.delete(netns_name, host_if))
        return row.to_json()

    def _ipv6_only(self, args: dict) -> str:
        """An IPv6-only endpoint has no IPv4 address (""); refused where that cannot work."""
        if self.pool6 is None:
            raise ApiError(
                "--ipv6-only needs an agent with an IPv6 pool: start it with --pool6 "
                "(cluster mode: --cluster-cidr6)"
            )
        if args.get("ip"):
            raise ApiError("--ipv6-only and --ip contradict each other: give one of them")
        return ""

    def _allocate_ip6(self, wanted) -> str:
        """The IPv6 address of a new endpoint: the one asked for (`--ip6`) or the pool's next
        free one; "" when the agent runs single stack (no --pool6)."""
        if self.pool6 is None:
            if wanted:
                raise ApiError("--ip6 needs an agent with an IPv6 pool: start it with --pool6")
            return ""
        used6 = [ep.ip6 for ep in self.store.endpoints() if ep.ip6]
        try:
            if wanted:
                return self.pool6.validate(str(wanted), used6)
            return self.pool6.allocate(used6)
        except ValueError as exc:
            raise ApiError(f"--ip6 {wanted}: {exc}") from None

    async def _register(self, row: EndpointRow, unplumb) -> None:
        """Store, index, attach and compile a plumbed endpoint; on any failure undo all of it
        (`unplumb` removes the plumbing) and raise. Called under the agent lock."""
        try:
            self.store.add_endpoint(row, self.allocator.to_state())
            self._index(row)
            self._endpoint_id(row.name)
            if self.cluster is not None:  # its IP -> identity for every other node
                await self.cluster.endpoint_added(row.ip, row.identity, row.ip6)
            # Datapath calls run in threads: pyroute2 cannot share the agent's uvloop.
            await asyncio.to_thread(
                self.datapath.endpoint_added, row.name, row.host_if, row.ip, row.identity, row.ip6
            )
            if hasattr(self.proxy, "endpoint_added"):
                await self.proxy.endpoint_added(row)
            compiled = await asyncio.to_thread(self._recompile, self.store.revision())
            await asyncio.to_thread(self._install, compiled)
        except BaseException:
            self.store.delete_endpoint(row.name)
            self._by_ip.pop(row.ip, None)
            self._by_ip.pop(row.ip6, None)
            self._release_identity(row.identity)
            if self.cluster is not None:
                with contextlib.suppress(Exception):
                    await self._cluster_endpoint_removed(row)
            with contextlib.suppress(Exception):
                await asyncio.to_thread(
                    self.datapath.endpoint_removed, row.name, row.host_if, row.ip, row.ip6
                )
            await asyncio.to_thread(unplumb)
            raise

    async def _unregister(self, ep: EndpointRow, unplumb) -> None:
        """Detach, unplumb and forget an endpoint, then recompile. Called under the agent lock."""
        if hasattr(self.proxy, "endpoint_removed"):
            await self.proxy.endpoint_removed(ep)
        await asyncio.to_thread(self.datapath.endpoint_removed, ep.name, ep.host_if, ep.ip, ep.ip6)
        await asyncio.to_thread(unplumb)
        self.store.delete_endpoint(ep.name)
        self._by_ip.pop(ep.ip, None)
        self._by_ip.pop(ep.ip6, None)
        self.endpoint_ids.pop(ep.name, None)
        self.store.put("endpoint_ids", self.endpoint_ids)
        self._release_identity(ep.identity)
        if self.cluster is not None:
            await self._cluster_endpoint_removed(ep)
        await self.fqdn_forget_endpoint(ep.name)  # its learned names (issue 21)
        self.ipcache = self._rebuild_ipcache()
        compiled = await asyncio.to_thread(self._recompile, self.store.revision())
        await asyncio.to_thread(self._install, compiled)

    def _release_identity(self, identity: int) -> None:
        """An endpoint identity no endpoint carries any more is released (and its number not
        reused), so containers that come and go leave no identity behind."""
        if self.cluster is not None:
            return  # a cluster id: other nodes' pods may carry it; etcd's GC decides
        if not any(ep.identity == identity for ep in self.store.endpoints()):
            self.allocator.release(identity)
            self.store.put("identities", self.allocator.to_state())

    async def op_endpoint_list(self, args: dict) -> list[dict]:
        out = []
        for ep in self.store.endpoints():
            item = ep.to_json()
            item["policy"] = self._enforcement(ep.name)
            if ep.name in self.terminating_endpoints:
                item["terminating"] = True  # in its deletion grace period
            if self.config.mode == "sidecar":
                cgroup_of = getattr(self.proxy, "cgroup_of", None)  # a container's: once made
                item["cgroup"] = cgroup_of(ep) if cgroup_of else str(netdev.cgroup_path(ep.netns))
            out.append(item)
        return out

    def _enforcement(self, name: str) -> dict:
        ep = (self.compiled.endpoints.get(name) if self.compiled is not None else None) or None
        if ep is None:
            return {"ingress": False, "egress": False}
        return {"ingress": bool(ep.ingress_enforced), "egress": bool(ep.egress_enforced)}

    async def op_endpoint_delete(self, args: dict) -> dict:
        name = str(args.get("name") or "")
        grace = _grace_period(args.get("grace_period"))
        try:
            if grace:  # services: no new flows to it, established ones finish (issue 16)
                await self._endpoint_terminate(name, grace)
            async with self._lock:
                ep = self.store.endpoint(name)
                if ep is None:
                    raise ApiError(f"no endpoint named {name}")
                if ep.adopted:
                    await self._unregister(ep, lambda: netdev.release(ep.host_if))
                else:
                    await self._unregister(ep, lambda: netdev.delete(ep.netns, ep.host_if))
        finally:
            self.terminating_endpoints.discard(name)
        return {"deleted": name}

    def _rebuild_ipcache(self):
        cache = policies.IPCache()
        cache.upsert(f"{self.pool.router}/32", policies.HOST)
        if self.pool6 is not None:
            cache.upsert(f"{self.pool6.router}/128", policies.HOST)
        for cidr, identity in self._cluster_ipcache_entries().items():
            cache.upsert(cidr, identity)
        for ep in self._by_ip.values():
            if ep.ip:
                cache.upsert(f"{ep.ip}/32", ep.identity)
            if ep.ip6:
                cache.upsert(f"{ep.ip6}/128", ep.identity)
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
        if self.cluster is not None:
            return await self._cluster_policy_import(files)
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
        if self.cluster is not None:
            return await self._cluster_policy_delete(args)
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
            "endpoints": {ep.name: ep.to_json() for ep in self.store.endpoints()},
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
            yield {"subscribed": True}  # the client knows the agent answered; no flow is missed
            for flow in self.flows.last(int(last) if last is not None else 0, flt):
                yield {"flow": flow}
            while True:
                yield {"flow": await queue.get()}
        finally:
            self.flows.unsubscribe(queue)


MAX_GRACE_PERIOD = 3600.0


def _grace_period(value) -> float:
    """`endpoint delete --grace-period S` (kubectl's flag): 0 deletes at once."""
    try:
        grace = float(value or 0)
    except (TypeError, ValueError):
        raise ApiError(f"--grace-period {value!r}: give seconds (e.g. 30)") from None
    if not 0 <= grace <= MAX_GRACE_PERIOD:
        raise ApiError(f"--grace-period {value}: give 0-{MAX_GRACE_PERIOD:.0f} seconds")
    return grace
