"""UDP upstreams: queries from different clients with the same id share one socket to the server,
leave with distinct ids, and each gets its own answer back with its own id. A real UDP server
on loopback answers (it echoes the query with QR set and the id it saw in the last two bytes)."""

import asyncio
import socket
import threading

from l7proxy.agent.dns_upstream import UdpUpstreams


def test_same_client_ids_do_not_mix_and_share_one_socket():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    seen = []

    def serve():
        while True:
            data, addr = server.recvfrom(512)
            if data == b"stop":
                return
            seen.append((addr, data[:2]))
            server.sendto(data[:2] + b"\x80\x00" + data[4:] + data[:2], addr)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def main():
        ups = UdpUpstreams(2.0)
        queries = [b"\x12\x34\x01\x00" + bytes([i]) * 8 for i in range(5)]  # one client id
        answers = await asyncio.gather(*(ups.ask(q, server.getsockname(), 256) for q in queries))
        ups.close()
        return queries, answers

    queries, answers = asyncio.run(main())
    server.sendto(b"stop", server.getsockname())
    thread.join(2)
    for q, a in zip(queries, answers, strict=True):
        assert a[:2] == b"\x12\x34" and a[4:12] == q[4:12]  # own id back, own answer
    assert len({addr for addr, _ in seen}) == 1  # one socket
    assert len({ident for _, ident in seen}) == 5  # distinct ids on the wire


def test_a_server_that_does_not_answer_times_out_and_a_late_answer_is_ignored():
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))

    async def main():
        ups = UdpUpstreams(0.2)
        results = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        ups.send(
            b"\x00\x07\x01\x00" + b"q" * 8, server.getsockname(), 1, lambda *r: results.append(r)
        )
        data, addr = server.recvfrom(512)  # arrives, but is not answered in time
        await asyncio.sleep(0.5)
        server.sendto(data[:2] + b"\x80\x00late", addr)  # too late: nobody waits for it
        await asyncio.sleep(0.1)
        ups.close()
        return results, loop.time() - started

    results, took = asyncio.run(main())
    server.close()
    assert len(results) == 1 and results[0][0] is None
    assert isinstance(results[0][1], TimeoutError) and took < 1.0
