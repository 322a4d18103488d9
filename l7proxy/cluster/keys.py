"""The etcd key layout, modelled on Cilium's kvstore layout (`cilium/state/...`).

Identities, the ipcache and nodes use Cilium's prefixes and value shapes; pod CIDRs and the policy
repository have no Cilium kvstore equivalent (Kubernetes holds them there) and live under
`l7proxy/state/`. docs/cluster.md lists every key with an example.
"""

from __future__ import annotations

CLUSTER = "default"

IDENTITIES = "cilium/state/identities/v1/"
IDENTITY_ID = IDENTITIES + "id/"  # id/<N> -> "k8s:a=b;k8s:c=d;" (the master key)
IDENTITY_VALUE = IDENTITIES + "value/"  # value/<labels>/<node> -> "<N>", leased (slave keys)
IDENTITY_LABELS = IDENTITIES + "labels/"  # labels/<labels> -> "<N>": one id per label set
IPCACHE = f"cilium/state/ip/v1/{CLUSTER}/"  # <ip> -> {"IP","HostIP","ID","Node"}, leased
NODES = f"cilium/state/nodes/v1/{CLUSTER}/"  # <name> -> node record JSON, leased
PODCIDRS = "l7proxy/state/podcidrs/v1/"  # <network_prefixlen> -> node name, leased
POLICY = "l7proxy/state/policy/v1"  # {"revision": R, "docs": [...]}: the whole set, one key


def labels_key(labels) -> str:
    """Cilium's label-array string: sorted labels, each followed by ';'."""
    return "".join(f"{lb};" for lb in sorted(labels))


def labels_from_key(text: str) -> list[str]:
    return [lb for lb in text.split(";") if lb]


def identity_id(number: int) -> str:
    return f"{IDENTITY_ID}{number}"


def identity_value(labels: str, node: str) -> str:
    return f"{IDENTITY_VALUE}{labels}/{node}"


def identity_labels(labels: str) -> str:
    return f"{IDENTITY_LABELS}{labels}"


def ipcache(ip: str) -> str:
    return f"{IPCACHE}{ip}"


def node(name: str) -> str:
    return f"{NODES}{name}"


def podcidr(cidr: str) -> str:
    return PODCIDRS + cidr.replace("/", "_")
