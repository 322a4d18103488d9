"""The one Python mirror of every struct and #define in nodeport.h (checked by
tests/kernel/test_nodeport_layout.py against what bcc reports)."""

from __future__ import annotations

import ctypes as ct

from redirect_bpf.sock_lb_structs import PROTO, be16, be32, ip_of, port_of  # noqa: F401

u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64

NP_FRONTEND_DSR = 1
NP_CT_LOCAL, NP_CT_SNAT, NP_CT_DSR, NP_CT_GONE, NP_CT_CLOSING = 1, 2, 4, 8, 16
NP_REV_SRC, NP_REV_SNAT = 1, 2
DSR_OPT_TYPE, DSR_OPT_LEN = 0x9A, 8

PROGRAMS = ("np_from_netdev", "np_to_netdev")


class FrontendKey(ct.Structure):
    _fields_ = [("addr", u32), ("port", u16), ("proto", u8), ("pad", u8)]


class Frontend(ct.Structure):
    _fields_ = [("vip", u32), ("vport", u16), ("flags", u8), ("pad", u8)]


class Config(ct.Structure):
    _fields_ = [("node_ip", u32), ("flags", u32)]


class Tuple(ct.Structure):
    _fields_ = [
        ("saddr", u32),
        ("daddr", u32),
        ("sport", u16),
        ("dport", u16),
        ("proto", u8),
        ("pad", u8),
        ("pad2", u16),
    ]


class Conntrack(ct.Structure):
    _fields_ = [
        ("backend_ip", u32),
        ("backend_port", u16),
        ("nat_port", u16),
        ("backend_id", u32),
        ("flags", u8),
        ("pad", u8),
        ("pad2", u16),
        ("last_ns", u64),
    ]


class Rev(ct.Structure):
    _fields_ = [
        ("front_ip", u32),
        ("front_port", u16),
        ("client_port", u16),
        ("client_ip", u32),
        ("flags", u8),
        ("pad", u8),
        ("pad2", u16),
    ]


class AffinityKey(ct.Structure):
    _fields_ = [("client_ip", u32), ("svc_id", u32)]


class AffinityVal(ct.Structure):
    _fields_ = [("backend_id", u32), ("pad", u32), ("last_ns", u64)]


# The maps of its own (name -> key, value), in the order of nodeport.c
MAPS: dict[str, tuple[type, type]] = {
    "np_frontends": (FrontendKey, Frontend),
    "np_config": (u32, Config),
    "np_ct": (Tuple, Conntrack),
    "np_rev": (Tuple, Rev),
    "np_affinity": (AffinityKey, AffinityVal),
}
# The maps it opens from the socket LB's and the datapath's pins (they must exist first)
SHARED_MAPS = (
    "lb_services",
    "lb_revs",
    "lb_slots",
    "lb_backends",
    "lb_maglev",
    "lb_svc_stats",
    "ep_by_ip",
    "ipcache",
    "nodes",
)
