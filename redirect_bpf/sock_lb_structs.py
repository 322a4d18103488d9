"""The one Python mirror of every struct and #define in sock_lb.h (checked by
tests/kernel/test_sock_lb_layout.py against what bcc reports), and of the cookie hash in sock_lb.c."""

from __future__ import annotations

import ctypes as ct
import socket

from redirect_bpf.ipcache import be32, ip_of  # noqa: F401 (re-exported)

u8, u16, u32, u64 = ct.c_uint8, ct.c_uint16, ct.c_uint32, ct.c_uint64

MAGLEV_CHUNK = 4096  # slots per lb_maglev entry (1 << MAGLEV_CHUNK_SHIFT)
MAGLEV_MAX_M = 131071
LB_FLAG_AFFINITY = 1
LB_FLAG_MAGLEV = 2
PROTO = {"TCP": socket.IPPROTO_TCP, "UDP": socket.IPPROTO_UDP}

# name -> (key type, value type); filled in below, in the order of sock_lb.c
MAPS: dict[str, tuple[type, type]] = {}
PROGRAMS = ("sock_lb_connect4", "sock_lb_sendmsg4", "sock_lb_recvmsg4", "sock_lb_getpeername4")


class SvcKey(ct.Structure):
    _fields_ = [("vip", u32), ("port", u16), ("proto", u8), ("pad", u8)]


class Svc(ct.Structure):
    _fields_ = [("rev", u32), ("pad", u32)]


class Rev(ct.Structure):
    _fields_ = [
        ("svc", SvcKey),
        ("svc_id", u32),
        ("count", u16),
        ("flags", u8),
        ("pad", u8),
        ("affinity_timeout_s", u32),
        ("maglev_m", u32),
    ]


class SlotKey(ct.Structure):
    _fields_ = [("rev", u32), ("slot", u32)]


class Backend(ct.Structure):
    _fields_ = [("ip", u32), ("port", u16), ("proto", u8), ("pad", u8)]


class MaglevKey(ct.Structure):
    _fields_ = [("rev", u32), ("chunk", u32)]


class MaglevChunk(ct.Structure):
    _fields_ = [("ids", u32 * MAGLEV_CHUNK)]


class AffinityKey(ct.Structure):
    _fields_ = [("netns_cookie", u64), ("svc_id", u32), ("pad", u32)]


class AffinityVal(ct.Structure):
    _fields_ = [("backend_id", u32), ("pad", u32), ("last_ns", u64)]


class SvcStats(ct.Structure):
    _fields_ = [("connects", u64), ("datagrams", u64), ("no_backend", u64), ("nodeport", u64)]


class RevnatKey(ct.Structure):
    _fields_ = [("cookie", u64), ("ip", u32), ("port", u16), ("pad", u16)]


class RevnatVal(ct.Structure):
    _fields_ = [("vip", u32), ("port", u16), ("pad", u16)]


MAPS.update(
    lb_services=(SvcKey, Svc),
    lb_revs=(u32, Rev),
    lb_slots=(SlotKey, u32),
    lb_backends=(u32, Backend),
    lb_maglev=(MaglevKey, MaglevChunk),
    lb_affinity=(AffinityKey, AffinityVal),
    lb_revnat=(RevnatKey, RevnatVal),
    lb_svc_stats=(u32, SvcStats),
)


# Addresses and ports as the maps hold them (network order), the same helpers the datapath uses
be16, port_of = socket.htons, socket.ntohs


def mix64(x: int) -> int:
    """sock_lb.c's mix64 (splitmix64's finalizer) on a socket cookie."""
    mask = (1 << 64) - 1
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & mask
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & mask
    x ^= x >> 31
    return x
