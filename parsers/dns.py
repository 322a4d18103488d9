"""DNS messages for the DNS proxy, sans-IO, on dnspython: read a query (its one question), build
the REFUSED answer the proxy gives instead of the server, read an answer's addresses and TTLs, and
the two-byte length framing of DNS over TCP.

Anything that is not a well-formed query with exactly one question raises DnsError: the proxy
drops it with a flow (it never answers what it could not read)."""

from __future__ import annotations

from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdatatype

MAX_UDP_MESSAGE = 65535
MAX_TCP_MESSAGE = 65535
REFUSED = dns.rcode.REFUSED


class DnsError(ValueError):
    """A message the proxy cannot read; the text says why."""


@dataclass(frozen=True, slots=True)
class DnsQuery:
    id: int
    name: str  # lower case, trailing dot
    qtype: str  # "A", "AAAA", ...
    message: object  # the dns.message.Message, to build an answer from


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    id: int
    rcode: str  # "NOERROR", "NXDOMAIN", ...
    name: str  # the question's name
    qtype: str
    # (ip, ttl) of every A/AAAA record of the answer section
    ips: tuple[tuple[str, int], ...]
    # the names that lead to these IPs: the question and every CNAME on the way
    names: tuple[str, ...]
    truncated: bool


def parse_query(wire: bytes) -> DnsQuery:
    try:
        msg = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError) as exc:
        raise DnsError(f"malformed DNS message: {type(exc).__name__}") from None
    if msg.flags & dns.flags.QR:
        raise DnsError("a DNS response where a query was expected")
    if msg.opcode() != dns.opcode.QUERY:
        raise DnsError(f"DNS opcode {dns.opcode.to_text(msg.opcode())} is not a query")
    if len(msg.question) != 1:
        raise DnsError(f"a DNS query with {len(msg.question)} questions (one expected)")
    q = msg.question[0]
    return DnsQuery(msg.id, q.name.to_text().lower(), dns.rdatatype.to_text(q.rdtype), msg)


def refused(query: DnsQuery) -> bytes:
    """The answer Cilium's proxy gives to a name the policy does not allow: REFUSED, same id and
    question, no records."""
    resp = dns.message.make_response(query.message)
    resp.set_rcode(REFUSED)
    return resp.to_wire()


def parse_answer(wire: bytes) -> DnsAnswer:
    try:
        msg = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError) as exc:
        raise DnsError(f"malformed DNS answer: {type(exc).__name__}") from None
    if not msg.flags & dns.flags.QR or len(msg.question) != 1:
        raise DnsError("not a DNS answer to one question")
    q = msg.question[0]
    name = q.name.to_text().lower()
    ips: list[tuple[str, int]] = []
    chain = [name]
    for rrset in msg.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            ips.extend((rd.address, rrset.ttl) for rd in rrset)
        elif rrset.rdtype == dns.rdatatype.CNAME:
            owner = rrset.name.to_text().lower()
            if owner in chain:
                chain.extend(rd.target.to_text().lower() for rd in rrset)
    return DnsAnswer(
        id=msg.id,
        rcode=dns.rcode.to_text(msg.rcode()),
        name=name,
        qtype=dns.rdatatype.to_text(q.rdtype),
        ips=tuple(ips),
        names=tuple(dict.fromkeys(chain)),
        truncated=bool(msg.flags & dns.flags.TC),
    )


def frame(wire: bytes) -> bytes:
    """One message as DNS over TCP sends it: a two-byte length, then the message."""
    return len(wire).to_bytes(2, "big") + wire


class TcpDeframer:
    """Cuts a DNS-over-TCP byte stream into messages (sans-IO): `feed(data)` returns the complete
    messages so far; a zero length raises DnsError."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out = []
        while len(self._buf) >= 2:
            size = int.from_bytes(self._buf[:2], "big")
            if size == 0:
                raise DnsError("a zero-length DNS message on TCP")
            if len(self._buf) < 2 + size:
                break
            out.append(bytes(self._buf[2 : 2 + size]))
            del self._buf[: 2 + size]
        return out
