"""Every constant datapath.h defines has one Python mirror in redirect_bpf/structs.py, with the
same value. The struct layouts have their kernel test (tests/kernel/test_struct_layout.py); this
is the same guard for the #defines, so a one-sided edit fails `make test` instead of making the
kernel and the agent disagree about a mark, a verdict or a flag."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from redirect_bpf import structs

HEADER = Path(structs.__file__).with_name("datapath.h")
DEFINE = re.compile(r"^\s*#define\s+([A-Z][A-Z0-9_]*)\s+(.+?)\s*(?://.*)?$")
# Map and ring sizes: C only, overridable with -D at load time (STYLE: -D is for sizes only).
SIZES = {
    "POLICY_MAP_SIZE",
    "IPCACHE_SIZE",
    "CT_MAP_SIZE",
    "CT6_MAP_SIZE",
    "ENDPOINT_MAP_SIZE",
    "EVENT_RING_SIZE",
    "SIDECAR_MAP_SIZE",
    "NODE_MAP_SIZE",
}


def _value(text: str) -> int:
    """Integer literals, parentheses, << and |: what datapath.h uses. Anything else fails loudly."""
    tree = ast.parse(text.replace("ULL", "").replace("UL", ""), mode="eval")
    allowed = (ast.Expression, ast.Constant, ast.BinOp, ast.LShift, ast.BitOr)
    for node in ast.walk(tree):
        if not isinstance(node, allowed):
            raise ValueError(f"unsupported #define value {text!r}")
    return eval(compile(tree, str(HEADER), "eval"))  # noqa: S307 - checked above: literals only


def header_defines(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        m = DEFINE.match(line)
        if m and not m.group(1).startswith("L7PROXY_"):  # the include guard
            out[m.group(1)] = _value(m.group(2))
    return out


DEFINES = header_defines(HEADER.read_text())


def test_the_header_has_the_defines_this_test_expects():
    assert SIZES <= DEFINES.keys()
    assert len(DEFINES) - len(SIZES) >= 29, "the #define parser stopped matching datapath.h"


@pytest.mark.parametrize("name", sorted(DEFINES.keys() - SIZES))
def test_every_constant_has_an_equal_python_mirror(name):
    assert hasattr(structs, name), (
        f"datapath.h defines {name} but redirect_bpf/structs.py has no mirror"
    )
    assert getattr(structs, name) == DEFINES[name], (
        f"{name}: datapath.h says {DEFINES[name]:#x}, structs.py says {getattr(structs, name):#x}"
    )


def test_sizes_stay_c_only():
    for name in SIZES:
        assert not hasattr(structs, name), f"{name} is a -D size: keep it out of structs.py"


def test_a_one_sided_edit_is_caught():
    edited = HEADER.read_text().replace(
        "#define MARK_TO_PROXY 0x7B000000", "#define MARK_TO_PROXY 0x7C000000"
    )
    assert header_defines(edited)["MARK_TO_PROXY"] != structs.MARK_TO_PROXY
