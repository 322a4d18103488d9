"""The datapath API the agent calls: load or re-open pins, attach endpoints, sync policy and the
ipcache, read events, counters and conntrack.

    dp = Datapath(node="node1")                 # /sys/fs/bpf/l7proxy/node1, reused if pinned
    dp.attach_endpoint("lxc123", endpoint_id=7, identity=1234, ipv4="10.0.0.5")
    dp.ipcache_upsert("10.0.0.5/32", 1234)
    stats = dp.sync(compiled, {"web": 7}, proxy_ports={3: 15001})
    reader = dp.events(on_flow=print)           # own thread; stop() it
    dp.close()                                  # agent exit: programs keep enforcing
    dp.destroy()                                # detach everything and remove the pins
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from policies import MapState
from redirect_bpf import bpfsys, cgroups, loader, routing, structs, sync, tc
from redirect_bpf.events import EventReader
from redirect_bpf.structs import (
    CtEntry,
    CtKey,
    DpConfig,
    EndpointInfo,
    IpcacheKey,
    IpcacheValue,
)

DEFAULT_CONFIG = {
    "flags": structs.CFG_EVENTS_FORWARDED,
    "ct_tcp_syn_s": 60,
    "ct_tcp_established_s": 21600,
    "ct_tcp_close_s": 10,
    "ct_udp_s": 60,
    "ct_other_s": 60,
}


def _be32(ip: str) -> int:
    return int.from_bytes(socket.inet_aton(ip), "little")


class Datapath:
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
        self._tries = {sync.DENY: self.maps["policy_deny"], sync.ALLOW: self.maps["policy_allow"]}
        # What the kernel holds now; a restarted agent starts from the pinned state.
        self._installed = sync.read_back(self._tries)
        self._synced_from: dict[int, tuple] = {}  # endpoint -> (MapState object, proxy ports)
        self._cgroup_fds: dict[str, int] = {}
        self._readers: list[EventReader] = []
        self._gc_stops: list[threading.Event] = []
        self._proxy_cgroup_fds: dict[str, int] = {}

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
        for fd in [*self._cgroup_fds.values(), *self._proxy_cgroup_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._cgroup_fds, self._proxy_cgroup_fds = {}, {}
        self._loaded.close()

    def detach_all(self) -> None:
        for ifindex, ep in list(self.endpoints().items()):
            try:
                self.detach_endpoint(socket.if_indextoname(ifindex))
            except OSError:  # the interface is gone: only the map entries are left
                self.maps["ep_by_ifindex"].delete(structs.u32(ifindex))
                self.maps["ep_by_ip"].delete(structs.u32(ep.ipv4))
                self._delete_policy_of(ep.endpoint_id)
        # cgroups attached by an earlier agent are known only by id: find their paths
        known = {os.stat(p).st_ino for p in self._cgroup_fds if os.path.exists(p)}
        for cg_id, _ in list(self.maps["ep_by_cgroup"].items()):
            if cg_id.value not in known and (path := cgroups.cgroup_path_of(cg_id.value)):
                self.detach_cgroup(path)
            self.maps["ep_by_cgroup"].delete(cg_id)
        for path in list(self._cgroup_fds):
            self.detach_cgroup(path)
        for path in list(self._proxy_cgroup_fds):
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

    def counters(self) -> dict[tuple[str, str, str], tuple[int, int]]:
        """(direction, verdict, reason) -> (packets, bytes), summed over CPUs."""
        out = {}
        counters = self.maps["counters"]
        for slot in range(2 * 3 * structs.REASONS):
            per_cpu = counters.get(structs.u32(slot))
            packets = sum(c.packets for c in per_cpu)
            if not packets:
                continue
            direction, rest = divmod(slot, 3 * structs.REASONS)
            verdict, reason = divmod(rest, structs.REASONS)
            key = (
                structs.DIRECTION_NAMES[direction],
                structs.VERDICT_NAMES[verdict],
                structs.REASON_NAMES.get(reason, str(reason)),
            )
            out[key] = (packets, sum(c.bytes for c in per_cpu))
        return out

    def conntrack(self) -> list[tuple[CtKey, CtEntry]]:
        return list(self.maps["conntrack"].items())

    def ct_gc(self, now_ns: int | None = None) -> int:
        """Delete expired conntrack entries (TCP-state-aware expiry set by the programs)."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        ct = self.maps["conntrack"]
        ks, vs = ct.key_size, ct.value_size
        try:
            expired = []
            for keys, values, n in bpfsys.map_lookup_batches(ct.fd, ks, vs):
                for i in range(n):
                    # expires_ns is the first field of struct ct_entry
                    if int.from_bytes(values[i * vs : i * vs + 8], "little") <= now:
                        expired.append(keys[i * ks : (i + 1) * ks])
        except NotImplementedError:
            return ct.delete_many(k for k, v in ct.items() if v.expires_ns <= now)
        ct.delete_many_raw(expired)
        return len(expired)

    def start_gc(self, interval: float = 30.0) -> threading.Event:
        """Run ct_gc() every `interval` seconds on a daemon thread until the returned event is
        set (close() sets it too)."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(interval):
                try:
                    self.ct_gc()
                except OSError:
                    return  # the maps were closed under us

        threading.Thread(target=loop, name="ct-gc", daemon=True).start()
        self._gc_stops.append(stop)
        return stop

    def prog_stats(self) -> dict[str, tuple[int, int]]:
        """name -> (run_time_ns, run_cnt); counts only while kernel.bpf_stats_enabled=1."""
        out = {}
        for name, fd in self._loaded.progs.items():
            info = bpfsys.fdinfo(fd)
            out[name] = (int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0)))
        return out

    # -- endpoints ---------------------------------------------------------------------------

    def endpoints(self) -> dict[int, EndpointInfo]:
        """ifindex -> endpoint info of every attached endpoint (survives restarts)."""
        return {k.value: v for k, v in self.maps["ep_by_ifindex"].items()}

    def attach_endpoint(
        self, ifname: str, endpoint_id: int, identity: int, ipv4: str
    ) -> EndpointInfo:
        """Enforce for an endpoint whose host-side veth is `ifname`. Until the first sync both
        directions are unenforced (allow), like an endpoint without policy."""
        ifindex = socket.if_nametoindex(ifname)
        old = self.maps["ep_by_ifindex"].get(structs.u32(ifindex))
        info = EndpointInfo(
            endpoint_id=endpoint_id,
            identity=identity,
            ifindex=ifindex,
            ipv4=_be32(ipv4),
            flags=old.flags if old and old.endpoint_id == endpoint_id else 0,
        )
        if old and old.ipv4 != info.ipv4:
            self.maps["ep_by_ip"].delete(structs.u32(old.ipv4))
        self.maps["ep_by_ifindex"].put(structs.u32(ifindex), info)
        self.maps["ep_by_ip"].put(structs.u32(info.ipv4), info)
        self.ipcache_upsert(f"{ipv4}/32", identity)
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
            self.maps["ep_by_ip"].delete(structs.u32(info.ipv4))
            self._delete_policy_of(info.endpoint_id)

    def attach_cgroup(
        self, cgroup_path: str | Path, endpoint_id: int, identity: int, sidecar_port: int
    ) -> int:
        """Sidecar mode: connect() calls in this cgroup v2 that policy marks for L7 go to
        127.0.0.1:sidecar_port. Returns the cgroup id."""
        path = str(cgroup_path)
        cg_id = os.stat(path).st_ino
        info = EndpointInfo(endpoint_id=endpoint_id, identity=identity, sidecar_port=sidecar_port)
        self.maps["ep_by_cgroup"].put(structs.u64(cg_id), info)
        fd = cgroups.open_dir(path)
        try:
            for prog, kind in cgroups.SIDECAR_HOOKS:
                cgroups.attach_once(self._loaded.progs[prog], fd, kind)
        except OSError:
            os.close(fd)
            raise
        old_fd = self._cgroup_fds.pop(path, None)
        if old_fd is not None:
            os.close(old_fd)
        self._cgroup_fds[path] = fd
        return cg_id

    def attach_proxy_cgroup(self, cgroup_path: str | Path) -> None:
        """Sidecar mode: processes in this cgroup (the sidecar proxy) get the original
        destination from getsockopt(SOL_IP, SO_ORIGINAL_DST) on their accepted sockets."""
        path = str(cgroup_path)
        fd = cgroups.open_dir(path)
        try:
            cgroups.attach_once(
                self._loaded.progs["sidecar_getsockopt"], fd, loader.BPF_CGROUP_GETSOCKOPT
            )
        except OSError:
            os.close(fd)
            raise
        old_fd = self._proxy_cgroup_fds.pop(path, None)
        if old_fd is not None:
            os.close(old_fd)
        self._proxy_cgroup_fds[path] = fd

    def detach_proxy_cgroup(self, cgroup_path: str | Path) -> None:
        fd = self._proxy_cgroup_fds.pop(str(cgroup_path), None)
        if fd is None:  # attached by an earlier agent
            try:
                fd = cgroups.open_dir(cgroup_path)
            except OSError:
                return
        with contextlib.suppress(OSError):
            bpfsys.prog_detach(
                self._loaded.progs["sidecar_getsockopt"], fd, loader.BPF_CGROUP_GETSOCKOPT
            )
        os.close(fd)

    def detach_cgroup(self, cgroup_path: str | Path) -> None:
        path = str(cgroup_path)
        fd = self._cgroup_fds.pop(path, None)
        if fd is None:  # attached by an earlier agent
            try:
                fd = cgroups.open_dir(path)
            except OSError:
                return
        for prog, kind in cgroups.SIDECAR_HOOKS:
            with contextlib.suppress(OSError):
                bpfsys.prog_detach(self._loaded.progs[prog], fd, kind)
        with contextlib.suppress(OSError):
            self.maps["ep_by_cgroup"].delete(structs.u64(os.fstat(fd).st_ino))
        os.close(fd)

    # -- ipcache -----------------------------------------------------------------------------

    @staticmethod
    def _ipcache_key(cidr: str) -> IpcacheKey:
        net = ipaddress.IPv4Network(cidr, strict=False)
        return IpcacheKey(prefixlen=net.prefixlen, addr=_be32(str(net.network_address)))

    def ipcache_upsert(self, cidr: str, identity: int) -> None:
        self.maps["ipcache"].put(self._ipcache_key(cidr), IpcacheValue(identity=identity))

    def ipcache_delete(self, cidr: str) -> bool:
        return self.maps["ipcache"].delete(self._ipcache_key(cidr))

    def ipcache_lookup(self, ip: str) -> int:
        value = self.maps["ipcache"].get(self._ipcache_key(f"{ip}/32"))
        return value.identity if value else structs.IDENTITY_WORLD

    def ipcache_sync(self, entries: Mapping[str, int]) -> int:
        """Make the ipcache equal to {cidr: identity}; returns the number of changes."""
        want = {bytes(self._ipcache_key(c)): i for c, i in entries.items()}
        have = {bytes(k): v.identity for k, v in self.maps["ipcache"].items()}
        changes = 0
        for kb, identity in want.items():
            if have.get(kb) != identity:
                self.maps["ipcache"].put(
                    IpcacheKey.from_buffer_copy(kb), IpcacheValue(identity=identity)
                )
                changes += 1
        for kb in have.keys() - want.keys():
            self.maps["ipcache"].delete(IpcacheKey.from_buffer_copy(kb))
            changes += 1
        return changes

    # -- policy ------------------------------------------------------------------------------

    def _set_enforcement(self, endpoint_id: int, ingress: bool, egress: bool, identity) -> bool:
        changed = False
        flags = (structs.EP_INGRESS_ENFORCED if ingress else 0) | (
            structs.EP_EGRESS_ENFORCED if egress else 0
        )
        for name in ("ep_by_ifindex", "ep_by_ip", "ep_by_cgroup"):
            m = self.maps[name]
            for k, info in m.items():
                if info.endpoint_id != endpoint_id:
                    continue
                if info.flags == flags and (identity is None or info.identity == identity):
                    continue
                info.flags = flags
                if identity is not None:
                    info.identity = identity
                m.put(k, info)
                changed = True
        return changed

    def _delete_policy_of(self, endpoint_id: int) -> None:
        self._installed.pop(endpoint_id, None)
        self._synced_from.pop(endpoint_id, None)
        for trie in self._tries.values():
            trie.delete_many([k for k in trie.keys() if k.endpoint_id == endpoint_id])

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
        return self._sync(
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
        return self._sync(work, proxy_ports or {})

    def _sync(self, work: Mapping[int, tuple], proxy_ports: Mapping[int, int]) -> sync.SyncStats:
        start = time.perf_counter()
        adds = updates = deletes = 0
        flags_changed = False
        ports = tuple(sorted(proxy_ports.items()))
        for ep_id, (map_state, ingress, egress, identity) in work.items():
            # The policy engine keeps the MapState object of an endpoint whose rules did not
            # change: then only the enforcement flags can differ, no entry needs a look.
            source = (map_state, ports)
            last = self._synced_from.get(ep_id)
            if isinstance(map_state, MapState) and last is not None and last[0] is map_state:
                if last[1] == ports:
                    flags_changed |= self._set_enforcement(ep_id, ingress, egress, identity)
                    continue
            self._synced_from[ep_id] = source
            desired = sync.desired_entries(ep_id, map_state, proxy_ports)
            current = self._installed.get(ep_id, {})
            writes, n_updates, dels = sync.plan(current, desired)
            sync.apply(self._tries, writes, dels)
            self._installed[ep_id] = desired
            flags_changed |= self._set_enforcement(ep_id, ingress, egress, identity)
            adds += len(writes) - n_updates
            updates += n_updates
            deletes += len(dels)
        if adds or updates or deletes or flags_changed:
            # Established flows re-check their verdict once on their next packet.
            cfg = self.config()
            self.set_config(policy_gen=(cfg.policy_gen + 1) & 0xFFFFFFFF)
        return sync.SyncStats(adds, updates, deletes, time.perf_counter() - start)

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
