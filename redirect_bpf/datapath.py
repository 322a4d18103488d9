"""The datapath API the agent calls: load or re-open pins, attach endpoints, sync policy and the
ipcache, read events, counters and conntrack.

    dp = Datapath(node="node1")                 # /sys/fs/bpf/l7proxy/node1, reused if pinned
    dp.attach_endpoint("lxc123", endpoint_id=7, identity=1234, ipv4="10.0.0.5",
                       ipv6="fd00:a7::5")           # either address may be None (single stack)
    dp.ipcache_upsert("10.0.0.5/32", 1234)      # or an IPv6 prefix: the ipcache6 twin map
    stats = dp.sync(compiled, {"web": 7}, proxy_ports={3: 15001})
    reader = dp.events(on_flow=print)           # own thread; stop() it
    dp.close()                                  # agent exit: programs keep enforcing
    dp.destroy()                                # detach everything and remove the pins
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from redirect_bpf import cgroups, conntrack, counters, ipcache, loader, routing, structs, sync, tc
from redirect_bpf.events import EventReader
from redirect_bpf.policy_writer import PolicyWriter
from redirect_bpf.structs import Ct6Key, CtEntry, CtKey, DpConfig, EndpointInfo, Ip6Key

DEFAULT_CONFIG = {
    "flags": structs.CFG_EVENTS_FORWARDED | structs.CFG_HOST_ROUTING,
    "ct_tcp_syn_s": 60,
    "ct_tcp_established_s": 21600,
    "ct_tcp_close_s": 10,
    "ct_udp_s": 60,
    "ct_other_s": 60,
}


class Datapath:
    """One node's loaded (or re-opened) programs and maps; each concern lives in its own module
    (ipcache, conntrack, counters, cgroups, policy_writer) and this class is the agent's handle."""

    def __init__(
        self,
        pin_dir: str | Path | None = None,
        *,
        node: str = "default",
        cflags: Iterable[str] = (),
    ):
        self.pin_dir = Path(pin_dir) if pin_dir else loader.pin_dir_for(node)
        self.node = node
        self._loaded = loader.load(self.pin_dir, tuple(cflags))
        self.maps = self._loaded.maps
        if not self._loaded.reused:
            self.set_config(policy_gen=1, **DEFAULT_CONFIG)
        routing.ensure_proxy_routing()
        self._policy = PolicyWriter(self.maps, self._bump_policy_generation)
        self._cgroups = cgroups.CgroupHooks(self._loaded.progs, self.maps["ep_by_cgroup"])
        self._readers: list[EventReader] = []
        self._gc_stops: list[threading.Event] = []

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def reused(self) -> bool:
        """True when this instance re-opened pins left by an earlier agent."""
        return self._loaded.reused

    @property
    def bpf(self):
        """The bcc module (only when this instance compiled the programs)."""
        return self._loaded.bpf

    @property
    def prog_fds(self) -> dict[str, int]:
        return dict(self._loaded.progs)

    def close(self) -> None:
        """Agent exit: drop our fds; programs, maps and attachments keep working."""
        for reader in self._readers:
            reader.stop()
        self._readers = []
        for stop in self._gc_stops:
            stop.set()
        self._cgroups.close()
        self._loaded.close()

    def detach_all(self) -> None:
        for ifindex, ep in list(self.endpoints().items()):
            try:
                self.detach_endpoint(socket.if_indextoname(ifindex))
            except OSError:  # the interface is gone: only the map entries are left
                self.maps["ep_by_ifindex"].delete(structs.u32(ifindex))
                self._forget_addresses(ep)
                self._policy.forget(ep.endpoint_id)
                self._bump_endpoint_generation()
        # cgroups attached by an earlier agent are known only by id: find their paths
        known = {os.stat(p).st_ino for p in self._cgroups.sidecar_fds if os.path.exists(p)}
        for cg_id, _ in list(self.maps["ep_by_cgroup"].items()):
            if cg_id.value not in known and (path := cgroups.cgroup_path_of(cg_id.value)):
                self.detach_cgroup(path)
            self.maps["ep_by_cgroup"].delete(cg_id)
        for path in list(self._cgroups.sidecar_fds):
            self.detach_cgroup(path)
        for path in list(self._cgroups.proxy_fds):
            self.detach_proxy_cgroup(path)

    def destroy(self, *, remove_routing: bool = False) -> None:
        """Detach everything and remove the pins. The proxy routing rule stays unless asked:
        it only matches our mark, and another datapath on this host (pinned elsewhere) may
        still rely on it."""
        self.detach_all()
        self.close()
        loader.unpin(self.pin_dir)
        if remove_routing:
            routing.remove_proxy_routing()

    # -- config, counters, conntrack ---------------------------------------------------------

    def config(self) -> DpConfig:
        return self.maps["config"].get(structs.u32(0))

    def set_config(self, **fields) -> None:
        cfg = self.config() or DpConfig()
        for name, value in fields.items():
            setattr(cfg, name, value)
        self.maps["config"].put(structs.u32(0), cfg)

    def _bump_policy_generation(self) -> None:
        self.set_config(policy_gen=(self.config().policy_gen + 1) & 0xFFFFFFFF)

    def set_host_routing(self, on: bool) -> None:
        """On (the default): the programs judge a pod-to-pod packet of this node at both ends
        and hand it into the destination pod's namespace (bpf_redirect_peer), as they do for
        tracked packets from other nodes; off: the host's stack forwards them, through its
        netfilter rules, and to_endpoint judges them on the destination's veth (Cilium's legacy
        host routing)."""
        switch_config_flag(self.maps["config"], structs.CFG_HOST_ROUTING, on)

    def host_routing(self) -> bool:
        return bool(self.config().flags & structs.CFG_HOST_ROUTING)

    def _bump_endpoint_generation(self) -> None:
        """A local endpoint's address or veth changed: flows look up where host routing
        delivers their packets again (ct_entry.deliver_ifindex)."""
        self.set_config(ep_gen=(self.config().ep_gen + 1) & 0xFFFFFFFF)

    def counters(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(direction, verdict, reason) -> (packets, bytes), summed over CPUs."""
        return counters.read(self.maps["counters"])

    def conntrack(self) -> list[tuple[CtKey, CtEntry]]:
        """The IPv4 flows (conntrack6() has the IPv6 ones)."""
        return list(self.maps["conntrack"].items())

    def conntrack6(self) -> list[tuple[Ct6Key, CtEntry]]:
        return list(self.maps["conntrack6"].items())

    def ct_gc(self, now_ns: int | None = None) -> int:
        """Delete expired conntrack entries of both families (TCP-state-aware expiry set by the
        programs)."""
        return sum(conntrack.gc(self.maps[m], now_ns) for m in ("conntrack", "conntrack6"))

    def start_gc(self, interval: float = 30.0) -> threading.Event:
        """Run ct_gc() every `interval` seconds on a daemon thread until the returned event is
        set (close() sets it too)."""
        stop = conntrack.start_gc_thread(
            [self.maps["conntrack"], self.maps["conntrack6"]], interval
        )
        self._gc_stops.append(stop)
        return stop

    def prog_stats(self) -> dict[str, tuple[int, int]]:
        """name -> (run_time_ns, run_cnt); counts only while kernel.bpf_stats_enabled=1."""
        return counters.prog_stats(self._loaded.progs)

    # -- endpoints ---------------------------------------------------------------------------

    def endpoints(self) -> dict[int, EndpointInfo]:
        """ifindex -> endpoint info of every attached endpoint (survives restarts)."""
        return {k.value: v for k, v in self.maps["ep_by_ifindex"].items()}

    def attach_endpoint(
        self,
        ifname: str,
        endpoint_id: int,
        identity: int,
        ipv4: str | None,
        ipv6: str | None = None,
    ) -> EndpointInfo:
        """Enforce for an endpoint whose host-side veth is `ifname` (an IPv4 address, an IPv6
        address or both). Until the first sync both directions are unenforced (allow), like an
        endpoint without policy."""
        if not ipv4 and not ipv6:
            raise ValueError(f"endpoint {endpoint_id}: needs an IPv4 or an IPv6 address")
        ifindex = socket.if_nametoindex(ifname)
        old = self.maps["ep_by_ifindex"].get(structs.u32(ifindex))
        info = EndpointInfo(
            endpoint_id=endpoint_id,
            identity=identity,
            ifindex=ifindex,
            ipv4=ipcache.be32(ipv4) if ipv4 else 0,
            flags=old.flags if old and old.endpoint_id == endpoint_id else 0,
        )
        if ipv6:
            info.ipv6 = ipcache.addr6(ipv6)
        if old:
            self._forget_addresses(old)
        self.maps["ep_by_ifindex"].put(structs.u32(ifindex), info)
        if ipv4:
            self.maps["ep_by_ip"].put(structs.u32(info.ipv4), info)
            self.ipcache_upsert(f"{ipv4}/32", identity)
        if ipv6:
            self.maps["ep_by_ip6"].put(Ip6Key(addr=info.ipv6), info)
            self.ipcache_upsert(f"{ipv6}/128", identity)
        self._bump_endpoint_generation()
        # A restarted agent finds the pinned programs still attached: leave them alone.
        if not (old and tc.has_filters(ifname)):
            tc.attach(
                ifname,
                ingress_fd=self._loaded.progs["from_endpoint"],
                egress_fd=self._loaded.progs["to_endpoint"],
            )
        return info

    def detach_endpoint(self, ifname: str) -> None:
        ifindex = socket.if_nametoindex(ifname)
        info = self.maps["ep_by_ifindex"].get(structs.u32(ifindex))
        tc.detach(ifname)
        if info:
            self.maps["ep_by_ifindex"].delete(structs.u32(ifindex))
            self._forget_addresses(info)
            self._policy.forget(info.endpoint_id)
            self._bump_endpoint_generation()

    def _forget_addresses(self, info: EndpointInfo) -> None:
        """Remove an endpoint's entries by address (ep_by_ip, ep_by_ip6)."""
        if info.ipv4:
            self.maps["ep_by_ip"].delete(structs.u32(info.ipv4))
        if any(info.ipv6):
            self.maps["ep_by_ip6"].delete(Ip6Key(addr=info.ipv6))

    def forget_endpoint(self, ip: str) -> bool:
        """Remove an endpoint whose veth is already gone (its container's namespace went away
        with it), found by either of its addresses: its map entries by address and its policy
        entries. True if it was known."""
        if ipcache.family(ip) == 6:
            want = bytes(ipcache.addr6(ip))
            match = lambda info: bytes(info.ipv6) == want  # noqa: E731
        else:
            want4 = ipcache.be32(ip)
            match = lambda info: info.ipv4 == want4  # noqa: E731
        found = False
        for key, info in list(self.maps["ep_by_ifindex"].items()):
            if match(info):
                self.maps["ep_by_ifindex"].delete(key)
                self._forget_addresses(info)
                self._policy.forget(info.endpoint_id)
                found = True
        if ipcache.family(ip) == 6:
            self.maps["ep_by_ip6"].delete(Ip6Key(addr=ipcache.addr6(ip)))
        else:
            self.maps["ep_by_ip"].delete(structs.u32(ipcache.be32(ip)))
        self._bump_endpoint_generation()
        return found

    def attach_cgroup(
        self, cgroup_path: str | Path, endpoint_id: int, identity: int, sidecar_port: int
    ) -> int:
        """Sidecar mode: connect() calls in this cgroup v2 that policy marks for L7 go to
        127.0.0.1:sidecar_port. Returns the cgroup id."""
        path = str(cgroup_path)
        cg_id = os.stat(path).st_ino
        info = EndpointInfo(endpoint_id=endpoint_id, identity=identity, sidecar_port=sidecar_port)
        self._cgroups.attach_sidecar(path, cg_id, info)
        return cg_id

    def attach_proxy_cgroup(self, cgroup_path: str | Path) -> None:
        """Sidecar mode: processes in this cgroup (the sidecar proxy) get the original
        destination from getsockopt(SOL_IP, SO_ORIGINAL_DST) on their accepted sockets."""
        self._cgroups.attach_proxy(str(cgroup_path))

    def detach_proxy_cgroup(self, cgroup_path: str | Path) -> None:
        self._cgroups.detach_proxy(str(cgroup_path))

    def detach_cgroup(self, cgroup_path: str | Path) -> None:
        self._cgroups.detach_sidecar(str(cgroup_path))

    # -- ipcache -----------------------------------------------------------------------------

    def ipcache_upsert(self, cidr: str, identity: int) -> None:
        """An IPv4 or IPv6 prefix (the latter goes to the ipcache6 twin)."""
        ipcache.upsert(ipcache.map_for(self.maps, cidr), cidr, identity)

    def ipcache_delete(self, cidr: str) -> bool:
        return ipcache.delete(ipcache.map_for(self.maps, cidr), cidr)

    def ipcache_lookup(self, ip: str) -> int:
        return ipcache.lookup(ipcache.map_for(self.maps, ip), ip)

    def ipcache_sync(self, entries: Mapping[str, int]) -> int:
        """Make both ipcaches equal to {cidr: identity} (IPv4 and IPv6 prefixes mixed); returns
        the number of changes."""
        v4 = {c: i for c, i in entries.items() if ipcache.family(c) == 4}
        v6 = {c: i for c, i in entries.items() if ipcache.family(c) == 6}
        return ipcache.sync(self.maps["ipcache"], v4) + ipcache.sync(self.maps["ipcache6"], v6)

    # -- policy ------------------------------------------------------------------------------

    def sync_endpoint(
        self,
        endpoint_id: int,
        map_state: Mapping,
        *,
        ingress_enforced: bool,
        egress_enforced: bool,
        proxy_ports: Mapping[int, int] | None = None,
        identity: int | None = None,
    ) -> sync.SyncStats:
        return self._policy.write(
            {endpoint_id: (map_state, ingress_enforced, egress_enforced, identity)},
            proxy_ports or {},
        )

    def sync(
        self,
        compiled,
        endpoint_ids: Mapping[str, int],
        proxy_ports: Mapping[int, int] | None = None,
    ) -> sync.SyncStats:
        """Write a CompiledPolicy's MapStates for the named endpoints as a diff against the
        kernel. proxy_ports maps l7_id -> the proxy's listener port (missing = fail closed)."""
        work = {}
        for name, ep_id in endpoint_ids.items():
            ep = compiled.endpoints.get(name)
            if ep is None:
                work[ep_id] = ({}, False, False, None)
            else:
                work[ep_id] = (
                    ep.map_state,
                    ep.ingress_enforced,
                    ep.egress_enforced,
                    ep.identity,
                )
        return self._policy.write(work, proxy_ports or {})

    # -- events ------------------------------------------------------------------------------

    def events(
        self,
        on_flow: Callable[[dict], None] | None = None,
        *,
        labels_of: Callable[[int], list[str]] | None = None,
    ) -> EventReader:
        """A started reader; flows go to on_flow (on the reader thread) or reader.queue.
        close() stops the readers still running."""
        reader = EventReader(
            self._loaded.ringbuf_fd, on_flow, node_name=self.node, labels_of=labels_of
        ).start()
        self._readers.append(reader)
        return reader


def switch_config_flag(config_map, flag: int, on: bool) -> bool:
    """Set or clear one CFG_* flag in a datapath's config map (this process's or a running
    agent's, opened from its pin); returns whether it was set before."""
    key = structs.u32(0)
    cfg = config_map.get(key)
    before = bool(cfg.flags & flag)
    cfg.flags = cfg.flags | flag if on else cfg.flags & ~flag
    config_map.put(key, cfg)
    return before
