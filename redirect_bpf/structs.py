"""The one Python mirror of every C struct in datapath.h, plus its constants.

tests/kernel/test_struct_layout.py checks each size and field offset against the types bcc
builds from the compiled C, so a drift between the two fails a test instead of corrupting maps.
(`struct tuple` and `struct verdict` in datapath.c live on the BPF stack only and never reach
userspace, so they have no mirror.)
"""

from __future__ import annotations

import ctypes as ct

from policies import identity, model

u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64

# Each constant below mirrors a #define of datapath.h; tests/unit/test_datapath_defines.py checks
# every pair, so a one-sided edit fails. Those that are policy concepts are taken from policies/.
DIR_INGRESS = model.INGRESS
DIR_EGRESS = model.EGRESS
DIRECTION_NAMES = {DIR_INGRESS: "INGRESS", DIR_EGRESS: "EGRESS"}

IDENTITY_ANY = 0
IDENTITY_HOST = identity.HOST
IDENTITY_WORLD = identity.WORLD
IDENTITY_REMOTE_NODE = identity.REMOTE_NODE
IDENTITY_WORLD_IPV6 = identity.WORLD_IPV6

MARK_MAGIC_MASK = 0xFF000000
MARK_IDENTITY_MASK = 0x00FFFFFF
MARK_FROM_PROXY = 0x7A000000
MARK_TO_PROXY = 0x7B000000
MARK_FROM_OVERLAY = 0x7C000000

VERDICT_FORWARDED = 0
VERDICT_DROPPED = 1
VERDICT_REDIRECTED = 2
VERDICT_NAMES = {0: "FORWARDED", 1: "DROPPED", 2: "REDIRECTED"}

REASON_NONE = 0
REASON_POLICY_DENIED = 1
REASON_POLICY_DENY = 2
REASON_NO_PROXY = 3
REASON_CT_REPLY = 4
REASON_CT_ESTABLISHED = 5
REASON_NEW_FLOW = 6
REASON_UNKNOWN_TUNNEL_SOURCE = 7
REASON_INVALID_IDENTITY = 8
REASON_NO_TUNNEL_ENDPOINT = 9
REASONS = 16
# Hubble's drop_reason_desc names where one exists (POLICY_DENIED, POLICY_DENY).
REASON_NAMES = {
    REASON_NONE: "",
    REASON_POLICY_DENIED: "POLICY_DENIED",
    REASON_POLICY_DENY: "POLICY_DENY",
    REASON_NO_PROXY: "NO_PROXY",
    REASON_CT_REPLY: "CT_REPLY",
    REASON_CT_ESTABLISHED: "CT_ESTABLISHED",
    REASON_NEW_FLOW: "NEW_FLOW",
    REASON_UNKNOWN_TUNNEL_SOURCE: "UNKNOWN_TUNNEL_SOURCE",
    REASON_INVALID_IDENTITY: "INVALID_IDENTITY",
    REASON_NO_TUNNEL_ENDPOINT: "NO_TUNNEL_ENDPOINT",
}

MATCH_NONE = 0
MATCH_L3 = 1
MATCH_L4 = 2
MATCH_NAMES = {MATCH_NONE: "none", MATCH_L3: "L3", MATCH_L4: "L4-only"}

EP_INGRESS_ENFORCED = 1
EP_EGRESS_ENFORCED = 2

CT_REDIRECTED = 1
CT_SEEN_REPLY = 2
CT_CLOSING = 4
CT_MACS = 8  # pod_mac/host_mac learned (valid while mac_gen is config.ep_gen)

CFG_EVENTS_FORWARDED = 1
CFG_HOST_ROUTING = 2  # to a pod of this node by bpf_redirect_peer

SIDECAR_READ = 1  # sidecar_orig.flags: a proxy's SO_ORIGINAL_DST answered from it
SIDECAR_CLIENT_CLOSED = 2  # the client's socket closed before any proxy read it

PROTO_NAMES = {1: "ICMPv4", 6: "TCP", 17: "UDP", 58: "ICMPv6", 132: "SCTP"}

# Bits of a policy key after its prefixlen field that always match: endpoint, identity, direction.
POLICY_FIXED_BITS = 32 + 32 + 8


class PolicyTrieKey(ct.Structure):
    _fields_ = [
        ("prefixlen", u32),
        ("endpoint_id", u32),
        ("identity", u32),
        ("direction", u8),
        ("proto", u8),
        ("dport", u16),  # network byte order
    ]


class PolicyTrieValue(ct.Structure):
    _fields_ = [
        ("proxy_port", u16),
        ("deny", u8),
        ("redirect", u8),
        ("key_proto", u8),
        ("key_prefix_len", u8),
        ("pad", u16),
        ("l7_id", u32),
    ]


class IpcacheKey(ct.Structure):
    _fields_ = [("prefixlen", u32), ("addr", u32)]  # addr in network byte order


# An IPv6 address as the maps hold it: 16 bytes in network order (four __be32 words in C).
Addr6 = u32 * 4


class Ipcache6Key(ct.Structure):
    _fields_ = [("prefixlen", u32), ("addr", Addr6)]


class Ip6Key(ct.Structure):
    _fields_ = [("addr", Addr6)]


class IpcacheValue(ct.Structure):
    # tunnel_endpoint: the owning node's underlay IP (network byte order), 0 = local or none
    _fields_ = [("identity", u32), ("tunnel_endpoint", u32)]


class NodeInfo(ct.Structure):
    _fields_ = [("node_id", u32), ("flags", u32)]


class EndpointInfo(ct.Structure):
    _fields_ = [
        ("endpoint_id", u32),
        ("identity", u32),
        ("ifindex", u32),
        ("ipv4", u32),
        ("flags", u8),
        ("pad", u8),
        ("sidecar_port", u16),
        ("ipv6", Addr6),  # all zero: no IPv6 address
    ]


def _ct_key_fields(addr: type) -> list[tuple[str, type]]:
    """The connection-tracking key of one family: the same layout around its address type."""
    return [
        ("addr_lo", addr),
        ("addr_hi", addr),
        ("port_lo", u16),
        ("port_hi", u16),
        ("proto", u8),
        ("pad", u8),
        ("pad2", u16),
        ("ifindex", u32),
    ]


class CtKey(ct.Structure):
    _fields_ = _ct_key_fields(u32)


class Ct6Key(ct.Structure):
    _fields_ = _ct_key_fields(Addr6)


class CtEntry(ct.Structure):
    _fields_ = [
        ("expires_ns", u64),
        ("src_identity", u32),
        ("dst_identity", u32),
        ("policy_gen", u32),
        ("endpoint_id", u32),
        ("orig_saddr", u32),
        ("orig_sport", u16),
        ("proxy_port", u16),
        ("flags", u8),
        ("tcp_flags", u8),
        ("direction", u8),
        ("pad", u8),
        ("refreshed", u32),  # jiffies (low 32 bits) of the last lifetime write
        ("deliver_ifindex", u32),  # host routing: the local endpoint's veth (0 = the stack)
        ("deliver_gen", u32),  # config.ep_gen when deliver_ifindex was looked up
        ("mac_gen", u32),  # config.ep_gen when the MACs were learned (CT_MACS)
        ("pod_mac", ct.c_uint8 * 6),  # the endpoint's MAC, learned from its packets
        ("host_mac", ct.c_uint8 * 6),  # the host side of its veth
    ]


class DpConfig(ct.Structure):
    _fields_ = [
        ("policy_gen", u32),
        ("flags", u32),
        ("ct_tcp_syn_s", u32),
        ("ct_tcp_established_s", u32),
        ("ct_tcp_close_s", u32),
        ("ct_udp_s", u32),
        ("ct_other_s", u32),
        ("ep_gen", u32),  # bumped when a local endpoint's address or veth changes
    ]


class Counter(ct.Structure):
    _fields_ = [("packets", u64), ("bytes", u64)]


class FlowEvent(ct.Structure):
    _fields_ = [
        ("ts_ns", u64),
        ("src_identity", u32),
        ("dst_identity", u32),
        ("saddr", u32),
        ("daddr", u32),
        ("sport", u16),
        ("dport", u16),
        ("endpoint_id", u32),
        ("proto", u8),
        ("direction", u8),
        ("verdict", u8),
        ("reason", u8),
        ("proxy_port", u16),
        ("match", u8),
        ("match_prefix_len", u8),
        ("match_identity", u32),
        ("match_proto", u8),
        ("match_deny", u8),
        ("match_port", u16),
    ]


class FlowEvent6(ct.Structure):
    """An IPv6 flow's record: FlowEvent (saddr/daddr 0) and then the two addresses."""

    _fields_ = [("base", FlowEvent), ("saddr6", Addr6), ("daddr6", Addr6)]


class SidecarAddr(ct.Structure):
    _fields_ = [("netns", u64), ("ip", u32), ("port", u16), ("proxy_port", u16)]


class SidecarOrig(ct.Structure):
    _fields_ = [
        ("daddr", u32),
        ("dport", u16),
        ("flags", u16),
        ("src_identity", u32),
        ("dst_identity", u32),
        ("daddr6", Addr6),  # a native IPv6 destination (daddr 0), else zero
    ]


# Map name -> (key mirror, value mirror, per-CPU). The loader pins exactly these maps.
MAPS: dict[str, tuple[type, type, bool]] = {
    "policy_deny": (PolicyTrieKey, PolicyTrieValue, False),
    "policy_allow": (PolicyTrieKey, PolicyTrieValue, False),
    "ipcache": (IpcacheKey, IpcacheValue, False),
    "conntrack": (CtKey, CtEntry, False),
    "ep_by_ifindex": (u32, EndpointInfo, False),
    "ep_by_ip": (u32, EndpointInfo, False),
    "ep_by_cgroup": (u64, EndpointInfo, False),
    "config": (u32, DpConfig, False),
    "counters": (u32, Counter, True),
    "sidecar_by_cookie": (u64, SidecarOrig, False),
    "sidecar_by_addr": (SidecarAddr, SidecarOrig, False),
    "nodes": (u32, NodeInfo, False),
    "ipcache6": (Ipcache6Key, IpcacheValue, False),
    "conntrack6": (Ct6Key, CtEntry, False),
    "ep_by_ip6": (Ip6Key, EndpointInfo, False),
}
RINGBUF = "events"
PROGRAMS = (
    "from_endpoint",
    "to_endpoint",
    "sidecar_connect4",
    "sidecar_connect6",
    "sidecar_sockops",
    "sidecar_getsockopt",
    "from_overlay",
    "to_overlay",
    "from_netdev",
)
