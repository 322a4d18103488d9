"""The agent in cluster mode (`--kvstore`): what changes in the agent, in one place.

Mixed into `Agent` next to `AgentOps`. With `--kvstore` the pod pool is the node's leased pod
CIDR, endpoint identities come from etcd, `policy import`/`delete` write the cluster's policy set
to etcd (every node compiles the set it receives through its watch, this one included), and
other nodes' pods enter the ipcache. Without `--kvstore` none of these methods is called.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import replace

import policies
from l7proxy.agent import policy_repo
from l7proxy.agent.api import ApiError
from l7proxy.agent.ipam import IPPool
from l7proxy.cluster import keys
from l7proxy.cluster.kvstore import EtcdKV, KVStoreDown, parse_url
from l7proxy.cluster.link import ClusterLink, LinkConfig, Owner, host_prefix
from l7proxy.cluster.records import PolicySet
from l7proxy.cluster.sink import RecordingSink

log = logging.getLogger("l7proxy.agent")

SAVED_KEY = "cluster"  # the agent store's key for {"lease", "pod_cidr"}


def default_underlay_ip(url: str) -> str:
    """The source address this host uses towards the first etcd endpoint."""
    host, port = parse_url(url)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # no packet is sent: this only picks the route
        return s.getsockname()[0]


def default_underlay_ip6(underlay_ip: str) -> str:
    """A global IPv6 address on the device that holds the IPv4 underlay address ("" if none):
    what other nodes route this node's IPv6 pod CIDR via in native routing."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        index = next(
            (a["index"] for a in ipr.get_addr(family=socket.AF_INET)
             if a.get_attr("IFA_ADDRESS") == underlay_ip),
            None,
        )  # fmt: skip
        if index is None:
            return ""
        for addr in ipr.get_addr(family=socket.AF_INET6, index=index):
            ip = ipaddress.IPv6Address(addr.get_attr("IFA_ADDRESS"))
            if ip.is_global or ip.is_private and not ip.is_link_local:
                return str(ip)
    return ""


class ClusterMode(Owner):
    cluster: ClusterLink | None = None
    cluster_sink = None
    _cluster_ready = False

    def _cluster_sink_default(self):
        # cluster datapath hook: the datapath replaces this recording sink with one that writes
        # tunnel endpoints, the nodes map and routes (see /tmp/cluster-contract.md)
        return RecordingSink()

    async def _join_cluster(self) -> None:
        c = self.config
        config = LinkConfig(
            url=c.kvstore,
            node=c.node_name,
            cluster_cidr=c.cluster_cidr,
            mask_size=c.node_cidr_mask_size,
            routing=c.routing,
            underlay_ip=c.underlay_ip or default_underlay_ip(c.kvstore),
            lease_ttl=c.node_lease_ttl,
            gc_interval=c.identity_gc_interval,
            cluster_cidr6=c.cluster_cidr6,
            mask_size6=c.node_cidr_mask_size6,
        )
        if c.cluster_cidr6:  # pyroute2 cannot run on this (running) loop's thread
            underlay6 = c.underlay_ip6 or await asyncio.to_thread(
                default_underlay_ip6, config.underlay_ip
            )
            config = replace(config, underlay_ip6=underlay6)
        if self.cluster_sink is None:
            self.cluster_sink = self._cluster_sink_default()
        self.cluster = ClusterLink(
            config,
            EtcdKV(c.kvstore),
            self.cluster_sink,
            self,
            self.store.get(SAVED_KEY, {}),
            lambda saved: self.store.put(SAVED_KEY, saved),
        )
        await self.cluster.start()
        self.pool = IPPool(self.cluster.pod_cidr)
        if self.cluster.pod_cidr6:  # dual stack: every endpoint also gets an IPv6 address
            self.pool6 = IPPool(self.cluster.pod_cidr6, 6)
        self.ipcache = self._rebuild_ipcache()
        self._learn_cluster_identities()
        log.info(
            "joined the cluster at %s as %s: pod CIDR %s, underlay %s",
            c.kvstore,
            c.node_name,
            self.cluster.pod_cidr,
            config.underlay_ip,
        )
        if self.cluster.pod_cidr6:
            log.info(
                "dual stack: IPv6 pod CIDR %s, IPv6 underlay %s",
                self.cluster.pod_cidr6,
                config.underlay_ip6 or "(none: no native IPv6 routes to this node)",
            )

    async def _cluster_after_start(self) -> None:
        """Re-publish the restored endpoints (a restart re-uses their identities) and take the
        cluster's policy set if it differs from the stored one."""
        for ep in self.store.endpoints():
            labels = keys.labels_key(_relevant(ep.labels))
            self.cluster.my_refs[labels] = ep.identity
            await self.cluster.identity_for(labels)
            await self.cluster.endpoint_added(ep.ip, ep.identity, ep.ip6)
        self._cluster_ready = True
        # The cluster's set wins over what this node had stored (a node that ran alone before
        # joining drops its own set; one that joins an empty cluster runs with none).
        cluster_set = self.cluster.policy or PolicySet(0, ())
        if cluster_set.revision != self.store.revision() or (
            self.cluster.policy is None and self.store.policies()
        ):
            await self.cluster_policy_changed(cluster_set)
        else:
            await self.cluster.policy_in_force(self.store.revision(), self.policy_error or "")

    def _learn_cluster_identities(self) -> None:
        for number, labels in self.cluster.identities.by_id.items():
            self.allocator.learn(number, keys.labels_from_key(labels))

    async def _cluster_identity(self, labels: list[str]) -> int:
        key = keys.labels_key(_relevant(labels))
        number = await self.cluster.identity_for(key)
        self.allocator.learn(number, keys.labels_from_key(key))
        return number

    def _cluster_ipcache_entries(self) -> dict[str, int]:
        if self.cluster is None:
            return {}
        return {host_prefix(ip): e.identity for ip, e in self.cluster.remote_ips.items()}

    async def _cluster_endpoint_removed(self, ep) -> None:
        labels = keys.labels_key(_relevant(ep.labels))
        still_used = any(
            keys.labels_key(_relevant(other.labels)) == labels
            for other in self.store.endpoints()
            if other.name != ep.name
        )
        await self.cluster.endpoint_removed(ep.ip, labels, still_used, ep.ip6)

    # Owner: called by the link on the event loop

    async def cluster_identities_changed(self) -> None:
        self._learn_cluster_identities()
        self._cluster_schedule_recompile()

    async def cluster_ipcache_changed(self) -> None:
        self._cluster_schedule_recompile()  # the recompile rebuilds the ipcache, once per burst

    async def cluster_policy_changed(self, policy: PolicySet) -> None:
        if not self._cluster_ready:
            return
        async with self._lock:
            same = [d.key for d in self.store.policies()] == [d.key for d in policy.docs]
            if policy.revision == self.store.revision() and same and self.compiled is not None:
                return
            docs = list(policy.docs)
            try:
                compiled = await asyncio.to_thread(self._recompile, policy.revision, docs)
            except ApiError as exc:
                self.policy_error = f"{exc}: {'; '.join(exc.details)}"
                log.error(
                    "cluster policy revision %d does not compile: %s",
                    policy.revision,
                    self.policy_error,
                )
                await self.cluster.policy_in_force(self.store.revision(), self.policy_error)
                return
            self.store.policy_replace(docs, policy.revision)
            await asyncio.to_thread(self._install, compiled)
        await self.cluster.policy_in_force(policy.revision)

    def _cluster_schedule_recompile(self) -> None:
        """One recompile for a burst of watch events (a node joining brings many at once)."""
        if not self._cluster_ready or getattr(self, "_cluster_pending", False):
            return
        self._cluster_pending = True
        self._cluster_task = asyncio.get_running_loop().create_task(self._cluster_recompile())

    async def _cluster_recompile(self) -> None:
        await asyncio.sleep(0)  # let the rest of the burst arrive first
        async with self._lock:
            self._cluster_pending = False  # a change from here on schedules another run
            self.ipcache = self._rebuild_ipcache()
            compiled = await asyncio.to_thread(self._recompile, self.store.revision())
            await asyncio.to_thread(self._install, compiled)

    # policy import/delete in cluster mode

    async def _cluster_policy_write(self, change) -> dict:
        """`change(current docs, revision)` -> (new docs, result); validated here, written to
        etcd, then applied here at once (the watch brings the same set to every other node)."""
        link = self.cluster
        if not link.reachable:
            raise ApiError(
                f"policy import needs the kvstore: {link.unreachable_reason()}; nothing changed, "
                "run it again when etcd is back"
            )
        async with self._lock:
            current = list(link.policy.docs) if link.policy else []
            revision = (link.policy.revision if link.policy else 0) + 1
            docs, result = change(current, revision)
            compiled = await asyncio.to_thread(self._recompile, revision, docs)
            try:
                await link.publish_policy(PolicySet(revision, tuple(docs)))
            except KVStoreDown as exc:
                raise ApiError(f"policy import needs the kvstore: {exc}; nothing changed") from None
            except ValueError as exc:
                raise ApiError(str(exc)) from None
            self.store.policy_replace(docs, revision)
            await asyncio.to_thread(self._install, compiled)
        await link.policy_in_force(revision)
        return {"revision": revision, **result}

    async def _cluster_policy_import(self, files: list[dict]) -> dict:
        def change(current, revision):
            new = []
            for f in files:
                new.extend(policy_repo.split_documents(f["name"], f["text"], revision))
            return policy_repo.merge(current, new), {"imported": [d.key for d in new]}

        return await self._cluster_policy_write(change)

    async def _cluster_policy_delete(self, args: dict) -> dict:
        def change(current, revision):
            if args.get("all"):
                return [], {"deleted": [d.key for d in current]}
            keep, gone = policy_repo.remove(current, str(args.get("name") or ""))
            if not gone:
                raise ApiError(f"no policy named {args.get('name')!r}")
            return keep, {"deleted": gone}

        return await self._cluster_policy_write(change)

    async def op_cluster_info(self, args: dict) -> dict:
        if self.cluster is None:
            raise ApiError("this agent is not in a cluster (it runs without --kvstore)")
        return self.cluster.status()


def _relevant(labels) -> list[str]:
    return policies.identity.identity_relevant(policies.parse_labels(",".join(labels))).to_strings()
