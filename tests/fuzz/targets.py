"""The fuzz targets: one function per parser or layer, bytes in, and the exception types that
target declares (anything else it raises is a finding).

Every target here declares none: the parsers answer bad input with error events, the layers with
a Close command, the policy loader with diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tests.fuzz.chunks import CLIENT, split


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    errors: tuple[type[BaseException], ...] = ()


# ---- HTTP/1: the request parser and the response parser (parsers/http1.py) ------------------

_METHODS = (b"GET", b"HEAD", b"CONNECT", b"POST")


def run_http1(data: bytes) -> None:
    """First byte: the method the response parser expects (low 2 bits) and whether it reports
    heads (bit 2). Client chunks feed a RequestParser (resumed after an Upgrade, as when the
    upstream refuses the switch), upstream chunks a ResponseParser (told the method again after
    each response)."""
    from parsers.http1 import (
        ParseError,
        Request,
        RequestParser,
        ResponseEnd,
        ResponseParser,
        Upgrade,
        head_bytes,
    )

    if not data:
        return
    method = _METHODS[data[0] & 3]
    requests = RequestParser()
    responses = ResponseParser(report_heads=bool(data[0] & 4))
    responses.expect(method)
    for direction, chunk in split(data[1:]):
        if direction == CLIENT:
            events = requests.receive_data(chunk)
            for event in events:
                if isinstance(event, Request):
                    head_bytes(event)
                elif isinstance(event, Upgrade):
                    events = requests.resume(event.rest)
            requests.in_head  # noqa: B018 - the properties the session reads
            requests.idle  # noqa: B018
            if events and isinstance(events[-1], ParseError):
                requests = RequestParser()
        else:
            for event in responses.receive_data(chunk):
                if isinstance(event, ResponseEnd):
                    responses.expect(method)
            responses.status  # noqa: B018
            responses.ends_at_close  # noqa: B018
            if responses.error is not None or responses.tunnel:
                responses = ResponseParser()
                responses.expect(method)


# ---- HTTP/2: the frame relay, both directions (parsers/http2/relay.py) -----------------------


def run_http2(data: bytes) -> None:
    """First byte: bit 0 starts the client side with the connection preface already given (the
    fuzzer then spends its bytes on frames), bit 1 ends with tick/drain/server_closed."""
    from parsers.http2 import H2Relay
    from parsers.http2 import frames as f

    if not data:
        return
    relay = H2Relay(_h2_decide)
    if data[0] & 1:
        relay.receive_client(f.PREFACE)
    for direction, chunk in split(data[1:]):
        if direction == CLIENT:
            relay.receive_client(chunk)
        else:
            relay.receive_server(chunk)
        relay.data_to_client()
        relay.data_to_server()
        if relay.closed:
            return
    if data[0] & 2:
        relay.tick()
        relay.drain()
        relay.server_closed()
        relay.data_to_client()
        relay.data_to_server()


def _h2_decide(request):
    from parsers.http2 import Decision

    path = request.path or ""
    if path.startswith("/private"):
        return Decision(False)
    if path.startswith("/rewrite"):
        return Decision(True, headers=((":path", "/rewritten"), ("x-added", "1")))
    return Decision(True)


# ---- Kafka: the layer, requests and responses (l7proxy/kafka/layer.py) ----------------------

_KAFKA_RULES: list = []


def _kafka_rules():
    if not _KAFKA_RULES:
        from policies.l7 import KafkaRuleSet
        from policies.model import KafkaRule

        _KAFKA_RULES.extend((
            None,  # no L7 restriction: everything is forwarded unparsed or parsed
            KafkaRuleSet([KafkaRule(api_keys=(0, 3, 18), topic="t1")]),  # produce t1 only
            KafkaRuleSet([KafkaRule(api_keys=(1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18),
                                    topic="t1"), KafkaRule(api_keys=(0,), client_id="app")]),
        ))  # fmt: skip
    return _KAFKA_RULES


_CUT_THROUGH = []  # the layer's (CUT_THROUGH_MIN, CUT_THROUGH_RETRY)


def run_kafka(data: bytes) -> None:
    """First byte: the policy (mod 3: none, produce-t1, consume-t1 plus produce by client id),
    bit 2 gateway mode (broker addresses rewritten), bit 3 whether topic id lookups find the id,
    bit 4 cut-through from 96 bytes on, retried every 48 (else from 64 KiB, more than an input
    holds), so that the prefix parse of a Produce still arriving is fuzzed too.
    Client chunks are requests, upstream chunks the broker's answers."""
    from l7proxy.kafka import layer as layer_module
    from l7proxy.kafka.layer import KafkaLayer, KafkaSettings, ResolveTopicIds

    if not data:
        return
    if not _CUT_THROUGH:
        _CUT_THROUGH.extend((layer_module.CUT_THROUGH_MIN, layer_module.CUT_THROUGH_RETRY))
    cut = (96, 48) if data[0] & 16 else _CUT_THROUGH
    layer_module.CUT_THROUGH_MIN, layer_module.CUT_THROUGH_RETRY = cut
    rules = _kafka_rules()[data[0] % 3]
    brokers = {("127.0.0.1", 9092): ("127.0.0.1", 19092)} if data[0] & 4 else None
    clock = iter(range(0, 1 << 62, 1_000_000)).__next__
    layer = KafkaLayer(lambda: rules, KafkaSettings(brokers=brokers), clock_ns=clock)
    for direction, chunk in split(data[1:]):
        out = layer.client_data(chunk) if direction == CLIENT else layer.upstream_data(chunk)
        for command in out:
            if isinstance(command, ResolveTopicIds):
                if data[0] & 8:
                    layer.learn_topic_ids(dict.fromkeys(command.ids, "t1"))
                layer.topic_ids_resolved()
        if layer.closed:
            return


# ---- Policy: YAML/JSON loader, parser and compiler (policies/) ------------------------------

_ENDPOINTS: dict = {}


def run_policy(data: bytes) -> None:
    """The bytes as a policy file (UTF-8, bad bytes replaced); when it loads without errors it is
    compiled for three Star Wars endpoints."""
    import policies as P

    if not _ENDPOINTS:
        for name, labels in (
            ("deathstar", "k8s:org=empire,k8s:class=deathstar,k8s:io.kubernetes.pod.namespace=default"),
            ("tiefighter", "k8s:org=empire,k8s:class=tiefighter,k8s:io.kubernetes.pod.namespace=default"),
            ("xwing", "k8s:org=alliance,k8s:class=xwing,k8s:io.kubernetes.pod.namespace=default"),
        ):  # fmt: skip
            _ENDPOINTS[name] = P.parse_labels(labels)
    result = P.load_text(data.decode("utf-8", "replace"), "fuzz.yaml")
    if result.ok:
        P.compile_policy(result.rules, _ENDPOINTS, P.IdentityAllocator(), P.IPCache(), 1)


# ---- DNS: queries, answers and TCP framing (parsers/dns.py) -----------------------------------


def run_dns(data: bytes) -> None:
    """The bytes as a query, as an answer (REFUSED is built for a query that reads), and as a
    DNS-over-TCP stream whose messages are read as queries. DnsError is the declared answer."""
    from parsers.dns import DnsError, TcpDeframer, parse_answer, parse_query, refused

    for parse in (parse_query, parse_answer):
        try:
            result = parse(data)
            if parse is parse_query:
                refused(result)
        except DnsError:
            pass
    try:
        messages = TcpDeframer().feed(data)
    except DnsError:
        messages = []
    for message in messages:
        try:
            parse_query(message)
        except DnsError:
            pass


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("http1", run_http1),
        Target("http2", run_http2),
        Target("kafka", run_kafka),
        Target("policy", run_policy),
        Target("dns", run_dns, ()),
    )
}
