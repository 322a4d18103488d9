"""The JSON values stored under the cluster's keys, one frozen dataclass each.

Node and ipcache values keep Cilium's field names (`Name`, `IPAddresses`, `IPv4AllocCIDR`;
`IP`, `HostIP`, `ID`), so `etcdctl get --prefix cilium/state/` reads like a Cilium cluster's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from l7proxy.agent.store import PolicyDoc


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    underlay_ip: str
    pod_cidr: str
    routing: str
    policy_revision: int  # the policy revision this node has in force
    endpoints: int = 0
    policy_error: str = ""
    pod_cidr6: str = ""  # a dual-stack node's IPv6 pod CIDR ("" = IPv4 only)
    underlay_ip6: str = ""  # its IPv6 address on the underlay (native routing's IPv6 next hop)

    def dumps(self) -> str:
        addresses = [{"Type": "InternalIP", "IP": self.underlay_ip}]
        if self.underlay_ip6:
            addresses.append({"Type": "InternalIP", "IP": self.underlay_ip6})
        extra = {"IPv6AllocCIDR": self.pod_cidr6} if self.pod_cidr6 else {}
        return json.dumps(
            {
                "Name": self.name,
                "IPAddresses": addresses,
                "IPv4AllocCIDR": self.pod_cidr,
                **extra,
                "Routing": self.routing,
                "PolicyRevision": self.policy_revision,
                "Endpoints": self.endpoints,
                "PolicyError": self.policy_error,
            },
            sort_keys=True,
        )

    @classmethod
    def loads(cls, text: str) -> NodeRecord:
        d = json.loads(text)
        ips = [a["IP"] for a in d.get("IPAddresses", []) if a.get("Type") == "InternalIP"]
        ips4 = [ip for ip in ips if ":" not in ip]
        ips6 = [ip for ip in ips if ":" in ip]
        return cls(
            str(d["Name"]),
            ips4[0] if ips4 else "",
            str(d.get("IPv4AllocCIDR", "")),
            str(d.get("Routing", "")),
            int(d.get("PolicyRevision", 0)),
            int(d.get("Endpoints", 0)),
            str(d.get("PolicyError", "")),
            str(d.get("IPv6AllocCIDR", "")),
            ips6[0] if ips6 else "",
        )


@dataclass(frozen=True, slots=True)
class IPEntry:
    ip: str
    identity: int
    host_ip: str  # the owning node's underlay IP: the tunnel endpoint
    node: str

    def dumps(self) -> str:
        return json.dumps(
            {"IP": self.ip, "ID": self.identity, "HostIP": self.host_ip, "Node": self.node},
            sort_keys=True,
        )

    @classmethod
    def loads(cls, text: str) -> IPEntry:
        d = json.loads(text)
        return cls(str(d["IP"]), int(d["ID"]), str(d.get("HostIP", "")), str(d.get("Node", "")))


@dataclass(frozen=True, slots=True)
class PolicySet:
    revision: int
    docs: tuple[PolicyDoc, ...]

    def dumps(self) -> str:
        return json.dumps(
            {
                "revision": self.revision,
                "docs": [
                    {
                        "key": d.key,
                        "name": d.name,
                        "namespace": d.namespace,
                        "source": d.source,
                        "text": d.text,
                        "revision": d.revision,
                    }
                    for d in self.docs
                ],
            }
        )

    @classmethod
    def loads(cls, text: str) -> PolicySet:
        d = json.loads(text)
        docs = tuple(
            PolicyDoc(
                x["key"], x["name"], x["namespace"], x["source"], x["text"], int(x["revision"])
            )
            for x in d.get("docs", [])
        )
        return cls(int(d["revision"]), docs)
