"""Policy routing for bpf_sk_assign: packets the tc program assigned to a proxy socket carry
MARK_TO_PROXY, and this rule makes the stack deliver them locally instead of forwarding them.

    ip rule add fwmark 0x7B000000/0xFF000000 lookup 2004 pref 90
    ip route add local 0.0.0.0/0 dev lo table 2004
    (and the same for IPv6: ip -6 rule ..., ip -6 route add local ::/0 dev lo table 2004)
"""

from __future__ import annotations

import contextlib
import errno
import socket

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from redirect_bpf import structs

PROXY_ROUTE_TABLE = 2004
PROXY_RULE_PRIORITY = 90
# The one ip rule: our mark's magic byte says TO_PROXY -> the local-delivery table.
PROXY_RULE = {
    "table": PROXY_ROUTE_TABLE,
    "priority": PROXY_RULE_PRIORITY,
    "fwmark": structs.MARK_TO_PROXY,
    "fwmask": structs.MARK_MAGIC_MASK,
}


_DEFAULT_ROUTE = {socket.AF_INET: "0.0.0.0/0", socket.AF_INET6: "::/0"}


def ensure_proxy_routing() -> None:
    """Packets the tc program assigned to a proxy socket (MARK_TO_PROXY) are delivered locally,
    IPv4 and IPv6 alike."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        for family, default in _DEFAULT_ROUTE.items():
            rules = ipr.get_rules(family=family)
            if not any(
                r.get_attr("FRA_TABLE") == PROXY_ROUTE_TABLE
                and r.get_attr("FRA_FWMARK") is not None
                for r in rules
            ):
                try:
                    ipr.rule("add", family=family, **PROXY_RULE)
                except NetlinkError as e:
                    if e.code != errno.EEXIST:  # another agent on this host added it just now
                        raise
            ipr.route(
                "replace",
                family=family,
                dst=default,
                type="local",
                oif=lo,
                table=PROXY_ROUTE_TABLE,
                scope=254,
            )


def remove_proxy_routing() -> None:
    with IPRoute() as ipr:
        for family, default in _DEFAULT_ROUTE.items():
            with contextlib.suppress(NetlinkError):
                ipr.rule("del", family=family, **PROXY_RULE)
            with contextlib.suppress(NetlinkError):
                ipr.route("del", family=family, dst=default, type="local", table=PROXY_ROUTE_TABLE)
