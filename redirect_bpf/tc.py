"""Attach tc classifiers with pyroute2: clsact + direct-action, always detached in `finally`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

INGRESS = "ffff:fff2"
EGRESS = "ffff:fff3"


def _ensure_clsact(ipr: IPRoute, ifindex: int) -> None:
    # A stale clsact from an earlier crash would keep old filters; replace it.
    with contextlib.suppress(NetlinkError):
        ipr.tc("del", "clsact", ifindex)
    ipr.tc("add", "clsact", ifindex)


@contextlib.contextmanager
def attached(
    ifname: str,
    *,
    ingress_fd: int | None = None,
    egress_fd: int | None = None,
    name: str = "l7proxy",
) -> Iterator[int]:
    """Attach BPF programs (by fd) to an interface's clsact hooks for the duration of the block."""
    with IPRoute() as ipr:
        ifindex = _ifindex(ipr, ifname)
        _ensure_clsact(ipr, ifindex)
        try:
            _add_filters(ipr, ifindex, ingress_fd, egress_fd, name)
            yield ifindex
        finally:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", ifindex)


def _ifindex(ipr: IPRoute, ifname: str) -> int:
    links = ipr.link_lookup(ifname=ifname)
    if not links:
        raise LookupError(f"no such interface: {ifname}")
    return links[0]


def _add_filters(ipr: IPRoute, ifindex: int, ingress_fd, egress_fd, name: str) -> None:
    for parent, fd in ((INGRESS, ingress_fd), (EGRESS, egress_fd)):
        if fd is not None:
            ipr.tc("add-filter", "bpf", ifindex, ":1", fd=fd, name=name, parent=parent,
                   classid=1, direct_action=True)  # fmt: skip


def attach(ifname: str, *, ingress_fd: int, egress_fd: int, name: str = "l7proxy") -> int:
    """Attach for the life of the interface (the datapath outlives the agent); see detach()."""
    with IPRoute() as ipr:
        ifindex = _ifindex(ipr, ifname)
        _ensure_clsact(ipr, ifindex)
        _add_filters(ipr, ifindex, ingress_fd, egress_fd, name)
        return ifindex


def detach(ifname: str) -> None:
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if links:
            with contextlib.suppress(NetlinkError):
                ipr.tc("del", "clsact", links[0])


def has_filters(ifname: str) -> bool:
    """True when both clsact hooks of the interface carry a BPF filter."""
    with IPRoute() as ipr:
        links = ipr.link_lookup(ifname=ifname)
        if not links:
            return False
        found = 0
        for parent in (INGRESS, EGRESS):
            try:
                filters = ipr.get_filters(links[0], parent=parent)
            except NetlinkError:
                return False
            if any(f.get_attr("TCA_KIND") == "bpf" for f in filters):
                found += 1
        return found == 2


def attach_ingress(ifname: str, *, ingress_fd: int, name: str = "l7proxy") -> int:
    """Only a tc ingress program; the clsact is added if missing and not replaced (the device may
    be shared, e.g. an underlay link)."""
    with IPRoute() as ipr:
        ifindex = _ifindex(ipr, ifname)
        with contextlib.suppress(NetlinkError):
            ipr.tc("add", "clsact", ifindex)
        _add_filters(ipr, ifindex, ingress_fd, None, name)
        return ifindex
