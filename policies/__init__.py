"""Policy engine: YAML -> model -> identities -> compiled MapState + L7 rule sets. Pure: no I/O;
`l7proxy.policy_files.load_paths` reads the files and hands their text to `load_sources`."""

from policies.compile import compile_policy
from policies.compiled import CompiledPolicy, EndpointPolicy, L4Verdict, diff, l4_verdict
from policies.diagnostics import Diagnostic, PolicyError
from policies.identity import (
    HEALTH,
    HOST,
    INGRESS_IDENTITY,
    INIT,
    KUBE_APISERVER,
    LOCAL_SCOPE,
    REMOTE_NODE,
    RESERVED,
    UNMANAGED,
    WORLD,
    WORLD_IPV4,
    WORLD_IPV6,
    IdentityAllocator,
    IPCache,
)
from policies.kafka_keys import API_KEYS as KAFKA_API_KEYS
from policies.kafka_keys import ROLES as KAFKA_ROLES
from policies.l7 import HttpRuleSet, HttpVerdict, KafkaRuleSet, KafkaVerdict, L7RuleSet
from policies.labels import NAMESPACE_KEY, Label, LabelSet, Selector, parse_labels
from policies.loader import LoadResult, load_sources, load_text
from policies.mapstate import MapChanges, MapState, PolicyEntry, PolicyKey
from policies.model import (
    EGRESS,
    INGRESS,
    PROTO_ANY,
    PROTO_ICMP,
    PROTO_SCTP,
    PROTO_TCP,
    PROTO_UDP,
    Rule,
)

__all__ = [
    "CompiledPolicy",
    "Diagnostic",
    "EGRESS",
    "EndpointPolicy",
    "HEALTH",
    "HOST",
    "HttpRuleSet",
    "HttpVerdict",
    "INGRESS",
    "INGRESS_IDENTITY",
    "INIT",
    "IPCache",
    "IdentityAllocator",
    "KAFKA_API_KEYS",
    "KAFKA_ROLES",
    "KUBE_APISERVER",
    "KafkaRuleSet",
    "KafkaVerdict",
    "L4Verdict",
    "L7RuleSet",
    "LOCAL_SCOPE",
    "Label",
    "LabelSet",
    "LoadResult",
    "MapChanges",
    "MapState",
    "NAMESPACE_KEY",
    "PROTO_ANY",
    "PROTO_ICMP",
    "PROTO_SCTP",
    "PROTO_TCP",
    "PROTO_UDP",
    "PolicyEntry",
    "PolicyError",
    "PolicyKey",
    "REMOTE_NODE",
    "RESERVED",
    "Rule",
    "Selector",
    "UNMANAGED",
    "WORLD",
    "WORLD_IPV4",
    "WORLD_IPV6",
    "compile_policy",
    "diff",
    "l4_verdict",
    "load_sources",
    "load_text",
    "parse_labels",
]
