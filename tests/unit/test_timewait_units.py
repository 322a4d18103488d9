"""The TIME_WAIT reaper's pieces that need no root: the sockstat count and the host-address test
(tests/e2e/test_agent_port_reuse.py runs the reaper against the node proxy)."""

from __future__ import annotations

import socket

from l7proxy.agent.timewait import is_host_address, time_wait_count


def test_time_wait_count_reads_the_tcp_line(tmp_path):
    path = tmp_path / "sockstat"
    path.write_text(
        "sockets: used 312\nTCP: inuse 14 orphan 0 tw 2071 alloc 20 mem 3\nUDP: inuse 4 mem 2\n"
    )
    assert time_wait_count(str(path)) == 2071
    path.write_text("sockets: used 1\n")
    assert time_wait_count(str(path)) == 0
    assert time_wait_count() >= 0  # this namespace's own file parses


def test_only_addresses_of_this_namespace_are_host_addresses():
    assert is_host_address("127.0.0.1")
    assert not is_host_address("192.0.2.77")  # TEST-NET-1: never configured here
    if socket.has_ipv6:
        assert is_host_address("::1")
        assert not is_host_address("2001:db8::77")
        # bind() cannot judge a link-local address without its interface: left alone
        assert is_host_address("fe80::1")
