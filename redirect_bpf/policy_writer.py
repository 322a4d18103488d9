"""Writing compiled policy into the kernel: per endpoint, the MapState as a byte-level diff against
what the tries hold (sync.py does the packing and planning), plus the endpoint's enforcement flags.

It remembers what it wrote, so a resync of an unchanged MapState object costs only a flag check,
and it starts from what the kernel holds, so a restarted agent's first sync is a no-op."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from policies import MapState
from redirect_bpf import structs, sync

ENDPOINT_MAPS = ("ep_by_ifindex", "ep_by_ip", "ep_by_cgroup")


class PolicyWriter:
    def __init__(self, maps: Mapping[str, object], bump_generation: Callable[[], None]) -> None:
        self._maps = maps
        self._tries = {sync.DENY: maps["policy_deny"], sync.ALLOW: maps["policy_allow"]}
        self._bump_generation = bump_generation
        # What the kernel holds now; a restarted agent starts from the pinned state.
        self._installed = sync.read_back(self._tries)
        self._synced_from: dict[int, tuple] = {}  # endpoint -> (MapState object, proxy ports)

    def forget(self, endpoint_id: int) -> None:
        """Remove every policy entry of an endpoint that is going away."""
        self._installed.pop(endpoint_id, None)
        self._synced_from.pop(endpoint_id, None)
        for trie in self._tries.values():
            trie.delete_many([k for k in trie.keys() if k.endpoint_id == endpoint_id])

    def write(self, work: Mapping[int, tuple], proxy_ports: Mapping[int, int]) -> sync.SyncStats:
        """work: endpoint id -> (map_state, ingress enforced, egress enforced, identity or None)."""
        start = time.perf_counter()
        adds = updates = deletes = 0
        flags_changed = False
        ports = tuple(sorted(proxy_ports.items()))
        for ep_id, (map_state, ingress, egress, identity) in work.items():
            # The policy engine keeps the MapState object of an endpoint whose rules did not
            # change: then only the enforcement flags can differ, no entry needs a look.
            last = self._synced_from.get(ep_id)
            if isinstance(map_state, MapState) and last is not None and last[0] is map_state:
                if last[1] == ports:
                    flags_changed |= self._set_enforcement(ep_id, ingress, egress, identity)
                    continue
            self._synced_from[ep_id] = (map_state, ports)
            desired = sync.desired_entries(ep_id, map_state, proxy_ports)
            writes, n_updates, dels = sync.plan(self._installed.get(ep_id, {}), desired)
            sync.apply(self._tries, writes, dels)
            self._installed[ep_id] = desired
            flags_changed |= self._set_enforcement(ep_id, ingress, egress, identity)
            adds += len(writes) - n_updates
            updates += n_updates
            deletes += len(dels)
        if adds or updates or deletes or flags_changed:
            # Established flows re-check their verdict once on their next packet.
            self._bump_generation()
        return sync.SyncStats(adds, updates, deletes, time.perf_counter() - start)

    def _set_enforcement(self, endpoint_id: int, ingress: bool, egress: bool, identity) -> bool:
        changed = False
        flags = (structs.EP_INGRESS_ENFORCED if ingress else 0) | (
            structs.EP_EGRESS_ENFORCED if egress else 0
        )
        for name in ENDPOINT_MAPS:
            m = self._maps[name]
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
