"""The gateway's policy: the compiled policy for the one endpoint it protects, an adapter over
`policies` (docs/contracts.md). (The agent's counterpart, with two endpoints per connection, is
`agent/connection_rules.py`.)

`GatewayPolicy.load()` reads the files, compiles them for the one endpoint the gateway protects
(`--labels`), and returns a `PolicySnapshot`; `reload()` swaps the snapshot only when the new
policy is valid, so an invalid file leaves the old policy in force. Peer identities come from the
`--peer CIDR=labels` table through the policy engine's IPCache (longest prefix wins, else world).
Every verdict is read from the one compiled structure: `l4_verdict` for the connection and the
L7 rule set it points to for each request.
"""

from __future__ import annotations

import os

from l7proxy.listener_decision import L4Decision
from policies.model import INGRESS, PROTO_TCP

ENDPOINT = "gateway"


class DenyAll:
    """The rule set of a connection whose L3/L4 verdict became deny after a reload."""

    parser = "http"
    allow_all = False

    def check(self, *args, **kwargs):
        from policies.l7 import HttpVerdict

        return HttpVerdict(False, ())


DENY_ALL = DenyAll()


class PolicySnapshot:
    """One compiled revision, with the per-source caches that make accept cheap."""

    def __init__(self, compiled, endpoint_identity, endpoint_labels, ipcache, allocator, files):
        self.compiled = compiled
        self.revision = compiled.revision
        self.endpoint_identity = endpoint_identity
        self.endpoint_labels = endpoint_labels
        self.ipcache = ipcache
        self.allocator = allocator
        self.files = files
        self._l4: dict[tuple[str, int], tuple[L4Decision, object]] = {}

    def _decide(self, ip: str, port: int) -> tuple[L4Decision, object]:
        hit = self._l4.get((ip, port))
        if hit is not None:
            return hit
        from policies import l4_verdict

        key = (ip, port)
        identity = self.ipcache.lookup(ip)
        labels = self.allocator.labels_of(identity)
        label_strs = tuple(str(lb) for lb in labels) if labels is not None else ()
        v = l4_verdict(self.compiled, ENDPOINT, identity, INGRESS, PROTO_TCP, port)
        rules = None
        if v.action == "redirect" and v.l7_id:
            rules = self.compiled.l7.get(v.l7_id)
        elif v.action == "deny":
            rules = DENY_ALL
        out = (L4Decision(v.action, identity, label_strs, v.reason), rules)
        if len(self._l4) > 65536:
            self._l4.clear()
        self._l4[key] = out
        return out

    def l4(self, ip: str, port: int) -> L4Decision:
        return self._decide(ip, port)[0]

    def rules_for(self, ip: str, port: int):
        """The L7 rule set for requests from `ip` to `port` (None = allow without L7 rules)."""
        return self._decide(ip, port)[1]

    def info(self) -> dict:
        return {
            "revision": self.revision,
            "files": list(self.files),
            "endpoint": {"identity": self.endpoint_identity, "labels": list(self.endpoint_labels)},
        }


NAMESPACE_LABEL = "io.kubernetes.pod.namespace"


def _with_namespace(labels: str) -> str:
    """A CiliumNetworkPolicy without metadata.namespace selects pods of `default`; an endpoint
    always has a namespace, so a gateway given none lives in `default` too."""
    if NAMESPACE_LABEL in labels:
        return labels
    return f"{labels},k8s:{NAMESPACE_LABEL}=default" if labels else f"k8s:{NAMESPACE_LABEL}=default"


class GatewayPolicy:
    def __init__(self, paths, endpoint_labels: str, peers=()) -> None:
        self.paths = tuple(paths)
        self.endpoint_labels = endpoint_labels
        self.peers = tuple(peers)
        self.current: PolicySnapshot | None = None
        self._revision = 0
        self._allocator = None
        self._mtimes: dict[str, float] = {}
        self.last_error: str | None = None

    def load(self) -> PolicySnapshot:
        """Compile the files now on disk; raises `policies.PolicyError` (or ValueError) when
        they are invalid, leaving `current` untouched."""
        from l7proxy.policy_files import load_paths
        from policies import IdentityAllocator, IPCache, compile_policy, parse_labels

        mtimes = self._file_mtimes()
        result = load_paths(list(self.paths), strict=True)
        if self._allocator is None:
            self._allocator = IdentityAllocator(None)
        allocator = self._allocator
        endpoint = parse_labels(_with_namespace(self.endpoint_labels))
        ipcache = IPCache()
        for peer in self.peers:
            ipcache.upsert(
                peer.cidr, allocator.allocate(parse_labels(_with_namespace(peer.labels)))
            )
        self._revision += 1
        compiled = compile_policy(
            result.rules, {ENDPOINT: endpoint}, allocator, ipcache, self._revision
        )
        ep = compiled.endpoints[ENDPOINT]
        snapshot = PolicySnapshot(
            compiled,
            ep.identity,
            tuple(str(lb) for lb in endpoint),
            ipcache,
            allocator,
            self.paths,
        )
        self.current = snapshot
        self._mtimes = mtimes
        self.last_error = None
        return snapshot

    def reload(self) -> tuple[bool, str]:
        """Try a new revision; on error keep the old one and say why."""
        try:
            snap = self.load()
        except Exception as exc:  # PolicyError, YAML errors, missing files
            diags = getattr(exc, "diagnostics", None)
            self.last_error = "; ".join(str(d) for d in diags) if diags else str(exc)
            self._mtimes = self._file_mtimes()  # don't retry the same broken file every tick
            return False, self.last_error
        return True, f"revision {snap.revision}"

    def changed_on_disk(self) -> bool:
        return self._file_mtimes() != self._mtimes

    def _file_mtimes(self) -> dict[str, float]:
        out = {}
        for path in self.paths:
            try:
                if os.path.isdir(path):
                    for name in sorted(os.listdir(path)):
                        full = os.path.join(path, name)
                        out[full] = os.stat(full).st_mtime_ns
                else:
                    out[path] = os.stat(path).st_mtime_ns
            except OSError:
                out[path] = -1
        return out
