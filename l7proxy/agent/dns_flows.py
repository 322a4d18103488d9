"""The DNS proxy's flows in Hubble's DNS shape: a REQUEST per query (FORWARDED, or DROPPED when
refused or unreadable) and a RESPONSE per answer (FORWARDED with the answer's IPs, TTL, CNAMEs and
rcode, or DROPPED when no answer came)."""

from __future__ import annotations

from l7proxy import flows

RCODE_NUMBERS = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "REFUSED": 5}


class Ends:
    """Who asked whom: the client and the server, their identities and labels, the transport."""

    __slots__ = ("src", "dst", "proto", "src_id", "src_labels", "dst_id", "dst_labels", "src_ep")

    def __init__(self, src, dst, proto, src_peer, dst_peer) -> None:
        self.src, self.dst, self.proto = src, dst, proto
        self.src_id, self.src_labels, self.src_ep = src_peer
        self.dst_id, self.dst_labels, _ = dst_peer


def dns_flow(
    ends: Ends,
    verdict,
    kind,
    query,
    reason,
    *,
    drop=None,
    rcode=None,
    answer=None,
    latency=0,
    time_ns: int | None = None,
) -> dict:
    dns = {"observation_source": "proxy"}
    if query is not None:
        dns.update(query=query.name, qtypes=[query.qtype])
    if answer is not None:
        dns.update(
            ips=[ip for ip, _ in answer.ips],
            ttl=min((ttl for _, ttl in answer.ips), default=0),
            cnames=list(answer.names[1:]),
            rcode=RCODE_NUMBERS.get(answer.rcode, 0),
            rrtypes=[answer.qtype] if answer.ips else [],
        )
    elif rcode is not None:
        dns["rcode"] = rcode
    name = query.name if query is not None else "?"
    qtype = query.qtype if query is not None else "?"
    if kind == "REQUEST":
        summary = f"DNS Query {name} {qtype}"
        if verdict == "DROPPED":
            summary += " (refused by policy)" if rcode == 5 else f" ({reason})"
    elif answer is not None:
        shown = ",".join(ip for ip, _ in answer.ips)
        summary = f'DNS Answer "{shown}" TTL: {dns["ttl"]} (Proxy {name} {qtype}) {answer.rcode}'
    else:
        summary = f"DNS Answer dropped ({reason})"
    flow = flows.build_flow(
        verdict=verdict,
        source=flows.endpoint(ends.src_id, ends.src_labels, ends.src[0]),
        destination=flows.endpoint(ends.dst_id, ends.dst_labels, ends.dst[0]),
        source_port=ends.src[1],
        destination_port=ends.dst[1],
        l7={"type": kind, "latency_ns": latency, "dns": dns},
        summary=summary,
        direction="EGRESS",
        drop_reason=drop,
        time_ns=time_ns,
    )
    flow["l4"] = {ends.proto: flow["l4"]["TCP"]}
    return flow
