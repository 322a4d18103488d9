"""`lb_lookup` lives in two BPF sources, sock_lb.c and nodeport.c, because bcc rewrites map
calls (`lb_services.lookup(key)`) only in the file it compiles: in an included header or a macro
the same function fails to compile or to load (checked with bcc 0.26). The two copies must stay
the same function; only the socket LB's copy has the test-only reader delay."""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[3] / "redirect_bpf"


def function(path: Path, name: str) -> str:
    text = path.read_text()
    start = text.index(f"static __always_inline int {name}(")
    end = text.index("\n}\n", start) + 3
    body = re.sub(r"//[^\n]*", "", text[start:end])
    lines = [line.strip() for line in body.splitlines()]
    return "\n".join(line for line in lines if line and not line.startswith("reader_delay"))


def test_the_two_lb_lookup_copies_are_the_same_function():
    socket_lb = function(SRC / "sock_lb.c", "lb_lookup")
    nodeport = function(SRC / "nodeport.c", "lb_lookup")
    # the socket LB's fault injection point, and nothing else, differs
    assert socket_lb.replace("if (i == 0)\n", "") == nodeport, (socket_lb, nodeport)
    for path in ("sock_lb.c", "nodeport.c"):
        assert "#define LB_LOOKUP_TRIES 4" in (SRC / path).read_text()
