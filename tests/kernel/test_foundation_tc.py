"""Foundation: a real tc program, compiled by bcc, attached by pyroute2, counts real traffic."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from tests.kernel.netns import pod

pytestmark = [pytest.mark.root, pytest.mark.bpf]

SRC = Path(__file__).resolve().parents[2] / "redirect_bpf" / "counter.c"


def test_tc_program_counts_tcp_traffic_from_a_namespace():
    from bcc import BPF

    from redirect_bpf.tc import attached

    bpf = BPF(src_file=str(SRC))
    ingress = bpf.load_func("count_ingress", BPF.SCHED_CLS)
    egress = bpf.load_func("count_egress", BPF.SCHED_CLS)
    payload = b"x" * 10_000
    with pod(201) as p:
        server = socket.socket()
        server.bind((p.host_ip, 0))
        server.listen(1)
        port = server.getsockname()[1]
        received = bytearray()

        def serve():
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(65536):
                    received.extend(chunk)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with attached(p.host_if, ingress_fd=ingress.fd, egress_fd=egress.fd):
            script = (
                f"import socket;s=socket.create_connection(('{p.host_ip}',{port}));"
                f"s.sendall(b'x'*{len(payload)});s.close()"
            )
            result = p.run("python3", "-c", script, timeout=20)
            assert result.returncode == 0, result.stderr
            t.join(10)
        server.close()
        counts = bpf["counts"]
        from_pod = counts[0]
        to_pod = counts[1]
    assert bytes(received) == payload
    # Packets leaving the namespace arrive on the host veth's ingress hook.
    assert from_pod.packets >= 3
    assert from_pod.bytes >= len(payload)
    assert to_pod.packets >= 2
