"""The kernel's sock_diag netlink interface, the parts this project uses: dump the TCP or UDP
sockets of one family in given states, and SOCK_DESTROY one of them (CONFIG_INET_DIAG_DESTROY).

Two users: the socket LB resets the sockets of a deleted backend (services/sock_terminate.py),
and the node proxy's TIME_WAIT reaper removes what its transparent connections leave in the
host namespace (agent/timewait.py). Every call works in the netlink socket's namespace."""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
SOCK_DESTROY = 21
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300

TCP_TIME_WAIT = 6

_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr
_REQ = struct.Struct("=BBBBI")  # struct inet_diag_req_v2 up to its inet_diag_sockid
_SOCKID = struct.Struct(">HH16s16s")  # sport, dport, src, dst (network order) ...
_SOCKID_TAIL = struct.Struct("=III")  # ... if, cookie[2] (host order)
SOCKID_LEN = _SOCKID.size + _SOCKID_TAIL.size  # 48
_MSG_HEAD = struct.Struct("=BBBB")  # inet_diag_msg: family, state, timer, retrans, then id
_ADDR_LEN = {socket.AF_INET: 4, socket.AF_INET6: 16}


@dataclass(frozen=True, slots=True)
class DiagSocket:
    proto: int
    dst: tuple[str, int]
    cookie: int
    sockid: bytes  # inet_diag_sockid as the kernel sent it: SOCK_DESTROY names it so
    family: int = socket.AF_INET
    state: int = 0
    src: tuple[str, int] = ("", 0)


def open_diag(timeout: float = 2.0) -> socket.socket:
    nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG)
    nl.settimeout(timeout)
    return nl


def _request(
    kind: int, flags: int, proto: int, states: int, sockid: bytes, seq: int, family: int
) -> bytes:
    body = _REQ.pack(family, proto, 0, 0, states) + sockid
    return _NLMSG.pack(_NLMSG.size + len(body), kind, flags, seq, 0) + body


def _messages(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        yield kind, data[offset + _NLMSG.size : offset + length]
        offset += (length + 3) & ~3


def _error(body: bytes) -> int:
    return -struct.unpack_from("=i", body)[0]


def dump(
    nl: socket.socket, proto: int, states: int, family: int = socket.AF_INET
) -> list[DiagSocket]:
    """Every socket of `proto` and `family` in the states given (a bit per TCP state)."""
    nl.send(_request(SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, proto, states,
                     bytes(SOCKID_LEN), 1, family))  # fmt: skip
    n = _ADDR_LEN[family]
    out = []
    while True:
        data = nl.recv(1 << 16)
        if not data:
            return out
        for kind, body in _messages(data):
            if kind == NLMSG_DONE:
                return out
            if kind == NLMSG_ERROR:
                code = _error(body)
                raise OSError(code, f"sock_diag dump: {os.strerror(code)}")
            _, state, _, _ = _MSG_HEAD.unpack_from(body)
            sockid = body[_MSG_HEAD.size : _MSG_HEAD.size + SOCKID_LEN]
            sport, dport, src, dst = _SOCKID.unpack_from(sockid)
            _, c0, c1 = _SOCKID_TAIL.unpack_from(sockid, _SOCKID.size)
            out.append(
                DiagSocket(
                    proto,
                    (socket.inet_ntop(family, dst[:n]), dport),
                    c0 | c1 << 32,
                    sockid,
                    family,
                    state,
                    (socket.inet_ntop(family, src[:n]), sport),
                )
            )


def destroy_one(nl: socket.socket, sock: DiagSocket) -> bool:
    """SOCK_DESTROY one socket; False when it is already gone."""
    return destroy_many(nl, [sock]) == 1


def destroy_many(nl: socket.socket, socks: Iterable[DiagSocket], batch: int = 128) -> int:
    """SOCK_DESTROY sockets, `batch` requests per send; returns how many the kernel destroyed
    (one already gone is not an error)."""
    destroyed = 0
    socks = list(socks)
    for start in range(0, len(socks), batch):
        chunk = socks[start : start + batch]
        nl.send(
            b"".join(
                _request(
                    SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, s.proto, 0, s.sockid, 2 + i, s.family
                )  # fmt: skip
                for i, s in enumerate(chunk)
            )
        )
        acks = 0
        while acks < len(chunk):
            for kind, body in _messages(nl.recv(1 << 16)):
                if kind != NLMSG_ERROR:
                    continue
                acks += 1
                code = _error(body)
                if code == 0:
                    destroyed += 1
                elif code != errno.ENOENT:
                    raise OSError(code, f"sock_diag destroy: {os.strerror(code)}")
    return destroyed
