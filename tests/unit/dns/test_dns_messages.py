"""parsers/dns.py: queries, REFUSED answers, answers with CNAME chains, TCP framing, bad input."""

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from parsers.dns import DnsError, TcpDeframer, frame, parse_answer, parse_query, refused


def answer_for(query, *rrsets):
    resp = dns.message.make_response(query)
    for text in rrsets:
        resp.answer.append(dns.rrset.from_text(*text))
    return resp.to_wire()


def test_query_reads_name_type_and_id():
    q = dns.message.make_query("API.Example.com.", "AAAA")
    got = parse_query(q.to_wire())
    assert (got.id, got.name, got.qtype) == (q.id, "api.example.com.", "AAAA")


def test_refused_keeps_id_and_question():
    q = dns.message.make_query("evil.com.", "A")
    resp = dns.message.from_wire(refused(parse_query(q.to_wire())))
    assert resp.id == q.id and resp.rcode() == dns.rcode.REFUSED
    assert resp.flags & dns.flags.QR and not resp.answer
    assert resp.question[0].name.to_text() == "evil.com."


def test_answer_follows_the_cname_chain():
    q = dns.message.make_query("www.example.com.", "A")
    wire = answer_for(
        q,
        ("www.example.com.", 300, "IN", "CNAME", "edge.example.net."),
        ("edge.example.net.", 60, "IN", "CNAME", "host.example.org."),
        ("host.example.org.", 5, "IN", "A", "192.0.2.1", "192.0.2.2"),
    )
    a = parse_answer(wire)
    assert a.rcode == "NOERROR" and a.id == q.id
    assert sorted(a.ips) == [("192.0.2.1", 5), ("192.0.2.2", 5)]
    assert a.names == ("www.example.com.", "edge.example.net.", "host.example.org.")


@pytest.mark.parametrize(
    "wire,why",
    [
        (b"", "malformed"),
        (b"\x00" * 5, "malformed"),
        (b"\xff" * 40, "response"),
        (b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01", "loop"),
        (b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x05ab", "past the end"),
        (dns.message.make_response(dns.message.make_query("a.", "A")).to_wire(), "response"),
        (dns.message.Message().to_wire(), "0 questions"),
    ],
)
def test_bad_queries_raise_dns_error(wire, why):
    with pytest.raises(DnsError, match=why):
        parse_query(wire)


def test_tcp_framing_in_pieces():
    q1 = dns.message.make_query("a.example.", "A").to_wire()
    q2 = dns.message.make_query("b.example.", "A").to_wire()
    stream = frame(q1) + frame(q2)
    d = TcpDeframer()
    out = []
    for i in range(0, len(stream), 7):
        out += d.feed(stream[i : i + 7])
    assert out == [q1, q2]
    with pytest.raises(DnsError, match="zero-length"):
        TcpDeframer().feed(b"\x00\x00")


def test_a_dot_inside_a_label_never_reads_as_two_labels():
    q = dns.message.make_query(dns.name.Name([b"allowed.example", b"com", b""]), "A")
    got = parse_query(q.to_wire())
    assert got.name == "allowed\\046example.com."
    assert got.name.count(".") == 2  # the name's own two separators only (dnspython: '\\.')
