"""Every C struct's Python mirror (redirect_bpf/structs.py) matches what bcc compiled: sizes,
field names and offsets of every map key and value, and the ring buffer's event record."""

from __future__ import annotations

import ctypes as ct
import uuid

import pytest

from redirect_bpf import bpfsys, structs
from tests.kernel.layouts import layout

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.timeout(60)]

C_TYPES = {"__u8": ct.c_uint8, "__u16": ct.c_uint16, "__be16": ct.c_uint16, "__u32": ct.c_uint32}
C_TYPES |= {"__be32": ct.c_uint32, "__u64": ct.c_uint64}


@pytest.fixture(scope="module")
def fresh():
    from redirect_bpf.datapath import Datapath

    dp = Datapath(f"/sys/fs/bpf/l7proxy/layout-{uuid.uuid4().hex[:8]}", node="layout")
    try:
        assert dp.bpf is not None, "a fresh pin directory must compile the programs"
        yield dp
    finally:
        dp.destroy()


def assert_same(mirror, compiled, what):
    assert ct.sizeof(mirror) == ct.sizeof(compiled), what
    if issubclass(compiled, ct.Structure):
        assert layout(mirror) == layout(compiled), what


@pytest.mark.parametrize("name", sorted(structs.MAPS))
def test_map_key_and_value_mirror_the_c_structs(fresh, name):
    key, value, percpu = structs.MAPS[name]
    table = fresh.bpf[name.encode()]
    assert_same(key, table.Key, f"{name} key")
    leaf = table.Leaf._type_ if percpu else table.Leaf
    assert_same(value, leaf, f"{name} value")
    # and what the kernel itself holds for the pinned map
    info = bpfsys.fdinfo(fresh.maps[name].fd)
    assert int(info["key_size"]) == ct.sizeof(key)
    assert int(info["value_size"]) == ct.sizeof(value)


def test_event_record_mirrors_the_c_struct(fresh):
    from bcc.libbcc import lib

    n = lib.bpf_perf_event_fields(fresh.bpf.module, structs.RINGBUF.encode())
    fields = [
        lib.bpf_perf_event_field(fresh.bpf.module, structs.RINGBUF.encode(), i).decode()
        for i in range(n)
    ]
    reported = [(f.split("#")[0], C_TYPES[f.split("#")[1]]) for f in fields]

    class Compiled(ct.Structure):
        _fields_ = reported

    assert [name for name, _ in structs.FlowEvent._fields_] == [name for name, _ in reported]
    assert_same(structs.FlowEvent, Compiled, "flow_event")
    assert ct.sizeof(structs.FlowEvent) == 48


def test_loaded_programs_are_the_expected_types(fresh):
    kinds = {name: int(bpfsys.fdinfo(fd)["prog_type"]) for name, fd in fresh.prog_fds.items()}
    assert kinds == {
        "from_endpoint": 3,  # BPF_PROG_TYPE_SCHED_CLS
        "to_endpoint": 3,
        "sidecar_connect4": 18,  # BPF_PROG_TYPE_CGROUP_SOCK_ADDR
        "sidecar_connect6": 18,
        "sidecar_sockops": 13,  # BPF_PROG_TYPE_SOCK_OPS
        "sidecar_getsockopt": 25,  # BPF_PROG_TYPE_CGROUP_SOCKOPT
        "from_overlay": 3,  # the cluster devices (redirect_bpf/overlay.py)
        "to_overlay": 3,
        "from_netdev": 3,
    }
