"""The Kafka connection logic without sockets: bytes in, commands out.

`KafkaLayer.client_data(bytes)` and `.upstream_data(bytes)` return a list of commands
(`ToUpstream`, `ToClient`, `Close`, `Record`). The asyncio session (session.py) carries them out;
tests drive the layer with plain bytes.

Requests are buffered one frame at a time (the policy needs every topic before the first byte goes
upstream) and forwarded as the same bytes. Responses stream: after the 8-byte size + correlation id
the rest is spliced to the client as it arrives, except the few responses the proxy rewrites
(ApiVersions, Metadata, FindCoordinator, DescribeCluster), which are buffered whole.

Kafka answers requests in order on a connection, so a synthesised denial waits in the same queue
as the forwarded requests and goes out when every earlier response has.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from parsers.kafka import denials
from parsers.kafka.apis import API_TABLE, TOPIC_AUTHORIZATION_FAILED, expects_response, topics_of
from parsers.kafka.codec import DecodeError
from parsers.kafka.frames import (
    FrameDecoder,
    FrameError,
    RequestHeader,
    check_size,
    frame,
    parse_request_header,
    response_header_size,
)
from parsers.kafka.responses import (
    API_VERSIONS,
    DESCRIBE_CLUSTER,
    FIND_COORDINATOR,
    METADATA,
    Address,
    cap_api_versions,
    rewrite_brokers,
    rewrite_metadata,
    supported_versions,
)

_SIZE_CID = struct.Struct(">ii")
PRODUCE, FETCH = 0, 1
# Versions that may carry broker endpoints in tagged fields (KIP-951): a gateway caps below them
# so that clients only ever learn broker addresses from the responses it rewrites.
GATEWAY_CAPS = {PRODUCE: 9, FETCH: 15}
# Largest response streamed through; far above any fetch.max.bytes a client asks for.
MAX_RESPONSE_BYTES = 1 << 30


@dataclass(frozen=True, slots=True)
class ToUpstream:
    data: bytes


@dataclass(frozen=True, slots=True)
class ToClient:
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    reason: str  # machine-friendly, e.g. "frame_too_large"
    detail: str


@dataclass(frozen=True, slots=True)
class Record:
    """One flow and its metrics: a request (per topic) or the end of a response."""

    kind: str  # "REQUEST" or "RESPONSE"
    verdict: str  # FORWARDED, DROPPED, ERROR
    api_key: int
    api_version: int
    correlation_id: int
    client_id: str | None = None
    topic: str | None = None
    error_code: int = 0
    latency_ns: int = 0
    reason: str | None = None


@dataclass(slots=True)
class _Pending:
    correlation_id: int
    api_key: int
    api_version: int
    flexible: bool
    started_ns: int
    synthetic: bytes | None = None  # a denial waiting its turn
    denied_topics: tuple = ()  # Metadata: (name, id) answered with 29 in the response


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    max_frame_size: int = 8 * 1024 * 1024
    # Gateway mode: broker address seen in responses -> gateway listener to advertise instead.
    brokers: Mapping[Address, Address] | None = None


class KafkaLayer:
    def __init__(
        self,
        rules: Callable[[], object],
        settings: KafkaSettings = KafkaSettings(),
        clock_ns: Callable[[], int] = lambda: 0,
    ) -> None:
        self._rules = rules
        self._settings = settings
        self._clock = clock_ns
        self._requests = FrameDecoder(settings.max_frame_size)
        self._pending: deque[_Pending] = deque()
        self._supported = supported_versions(GATEWAY_CAPS if settings.brokers else None)
        self.topic_names: dict[bytes, str] = {}  # topic id -> name, learned from Metadata
        # Response side: bytes of the current response still to splice, or a buffered frame.
        self._resp_head = bytearray()
        self._resp_left = 0
        self._resp_buffer: bytearray | None = None
        self._resp_size = 0
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    # ---- client -> upstream -------------------------------------------------------------

    def client_data(self, data: bytes) -> list:
        if self.closed:
            return []
        out: list = []
        try:
            frames = self._requests.receive_data(data)
        except FrameError as exc:
            return self._close(out, exc.reason, str(exc))
        for payload in frames:
            self._request(payload, out)
            if self.closed:
                break
        return out

    def _request(self, payload: bytes, out: list) -> None:
        now = self._clock()
        key = int.from_bytes(payload[0:2], "big", signed=True) if len(payload) >= 2 else -1
        spec = API_TABLE.get(key)
        try:
            header = parse_request_header(payload, spec.flexible_min if spec else None)
        except FrameError as exc:
            self._close(out, exc.reason, str(exc))
            return
        version = header.api_version
        rules = self._rules()
        if spec is None or not spec.versions[0] <= version <= spec.versions[1]:
            # No parser: only a policy without L7 restrictions lets it through.
            if rules is None or rules.allow_all:
                out.append(ToUpstream(frame(payload)))
                self._pending.append(_Pending(header.correlation_id, key, version, False, now))
                out.append(Record("REQUEST", "FORWARDED", key, version, header.correlation_id,
                                  header.client_id))  # fmt: skip
                return
            self._close(out, "unsupported_api",
                        f"api {key} v{version} has no parser and the policy restricts Kafka",
                        header)  # fmt: skip
            return
        try:
            request, _ = spec.request_codec(version).decode(memoryview(payload), header.body_offset)
        except (DecodeError, KeyError, UnicodeDecodeError) as exc:
            self._close(out, "malformed_request", f"{spec.spec_name} v{version}: {exc}", header)
            return
        refs = topics_of(key, version, request)
        names = list(refs.names)
        unknown_ids = []
        for topic_id in refs.ids:
            name = self.topic_names.get(topic_id)
            if name is None:
                unknown_ids.append(topic_id)
            else:
                names.append(name)
        pending = _Pending(header.correlation_id, key, version, spec.flexible(version), now)
        if rules is None or rules.allow_all:
            self._forward(payload, header, request, pending, names, out)
            return
        verdict = rules.check(key, version, header.client_id, names)
        if unknown_ids and verdict.allowed and not _topic_free(rules, key, version, header):
            # A topic id no Metadata response on this connection named: fail closed.
            self._deny(spec, header, request, pending, names, out, topic_denied=True,
                       denied=tuple(t.hex() for t in unknown_ids))  # fmt: skip
            return
        if verdict.allowed:
            self._forward(payload, header, request, pending, names, out)
            return
        if key == METADATA and verdict.denied_topics and not refs.all_topics:
            self._metadata_subset(payload, header, request, pending, rules, out)
            return
        self._deny(spec, header, request, pending, names, out,
                   topic_denied=bool(verdict.denied_topics), denied=verdict.denied_topics)  # fmt: skip

    def _forward(self, payload, header: RequestHeader, request, pending, names, out) -> None:
        out.append(ToUpstream(frame(payload)))
        if expects_response(header.api_key, request):
            self._pending.append(pending)
        for topic in names or (None,):
            out.append(Record("REQUEST", "FORWARDED", header.api_key, header.api_version,
                              header.correlation_id, header.client_id, topic))  # fmt: skip

    def _deny(self, spec, header, request, pending, names, out, topic_denied, denied) -> None:
        code = denials.code_for(spec, topic_denied, request)
        for topic in names or (None,):
            out.append(Record("REQUEST", "DROPPED", header.api_key, header.api_version,
                              header.correlation_id, header.client_id, topic, code,
                              reason="POLICY_DENIED"))  # fmt: skip
        if not expects_response(header.api_key, request):
            # acks=0: the client reads no answer; a broker closes the connection on error too.
            self._close(out, "denied_without_response", "denied produce with acks=0", header)
            return
        response = denials.error_response(spec, header.api_version, header.correlation_id,
                                          request, code)  # fmt: skip
        if response is None:
            self._close(out, "unanswerable_denial",
                        f"{spec.spec_name} v{header.api_version} has no error field", header)  # fmt: skip
            return
        pending.synthetic = response
        self._pending.append(pending)
        self._flush_synthetic(out)

    def _metadata_subset(self, payload, header, request, pending, rules, out) -> None:
        """Forward Metadata for the allowed topics only; the denied ones come back as 29."""
        allowed, denied = [], []
        for topic in request["topics"]:
            name = topic.get("name") or self.topic_names.get(topic.get("topic_id"))
            ok = name is not None and rules.check(METADATA, header.api_version,
                                                  header.client_id, [name]).allowed  # fmt: skip
            (allowed if ok else denied).append(topic)
        if not allowed and header.api_version == 0:
            # v0 reads an empty list as "all topics": answer it here instead.
            names = [t.get("name") for t in denied]
            self._deny(API_TABLE[METADATA], header, request, pending, names, out, True, ())
            return
        for topic in allowed:
            out.append(Record("REQUEST", "FORWARDED", METADATA, header.api_version,
                              header.correlation_id, header.client_id, topic.get("name")))  # fmt: skip
        for topic in denied:
            out.append(Record("REQUEST", "DROPPED", METADATA, header.api_version,
                              header.correlation_id, header.client_id, topic.get("name"),
                              TOPIC_AUTHORIZATION_FAILED, reason="POLICY_DENIED"))  # fmt: skip
        body = bytearray(payload[: header.body_offset])
        API_TABLE[METADATA].request_codec(header.api_version).encode(
            body, {**request, "topics": allowed}
        )
        pending.denied_topics = tuple((t.get("name"), t.get("topic_id")) for t in denied)
        out.append(ToUpstream(frame(body)))
        self._pending.append(pending)

    # ---- upstream -> client -------------------------------------------------------------

    def upstream_data(self, data: bytes) -> list:
        if self.closed:
            return []
        out: list = []
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end and not self.closed:
            if self._resp_left:
                n = min(self._resp_left, end - pos)
                out.append(ToClient(view[pos : pos + n]))
                pos += n
                self._resp_left -= n
                if not self._resp_left:
                    self._response_done(out)
                continue
            if self._resp_buffer is not None:
                need = self._resp_size - len(self._resp_buffer)
                self._resp_buffer += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._resp_buffer) == self._resp_size:
                    self._rewrite_response(out)
                continue
            need = 8 - len(self._resp_head)
            self._resp_head += view[pos : pos + need]
            pos += min(need, end - pos)
            if len(self._resp_head) == 8:
                self._response_start(out)
        return out

    def _response_start(self, out: list) -> None:
        size, correlation_id = _SIZE_CID.unpack(self._resp_head)
        head = bytes(self._resp_head)
        self._resp_head.clear()
        try:
            check_size(size, MAX_RESPONSE_BYTES)
            if size < 4:
                raise FrameError("short_response", f"response of {size} bytes")
        except FrameError as exc:
            self._close(out, exc.reason, f"upstream: {exc}")
            return
        if not self._pending or self._pending[0].synthetic is not None:
            self._close(out, "unexpected_response",
                        f"upstream sent correlation id {correlation_id} with none pending")  # fmt: skip
            return
        pending = self._pending[0]
        if pending.correlation_id != correlation_id:
            self._close(out, "correlation_mismatch",
                        f"upstream answered {correlation_id}, expected {pending.correlation_id}")  # fmt: skip
            return
        if self._rewrites(pending):
            self._resp_size = size + 4
            self._resp_buffer = bytearray(head)
            if size == 4:
                self._rewrite_response(out)
            return
        out.append(ToClient(head))
        self._resp_left = size - 4
        if not self._resp_left:
            self._response_done(out)

    def _rewrites(self, pending: _Pending) -> bool:
        key = pending.api_key
        if key == API_VERSIONS or key == METADATA:
            return True
        return bool(self._settings.brokers) and key in (FIND_COORDINATOR, DESCRIBE_CLUSTER)

    def _rewrite_response(self, out: list) -> None:
        framed = bytes(self._resp_buffer)
        self._resp_buffer = None
        pending = self._pending[0]
        payload = framed[4:]
        try:
            start = response_header_size(pending.api_key, pending.flexible, payload)
            body = self._new_body(pending, payload[start:])
        except (DecodeError, FrameError, KeyError, UnicodeDecodeError) as exc:
            self._close(out, "malformed_response", f"api {pending.api_key}: {exc}")
            return
        out.append(ToClient(framed if body is None else frame(payload[:start] + body)))
        self._response_done(out)

    def _new_body(self, pending: _Pending, body: bytes) -> bytes | None:
        key, version = pending.api_key, pending.api_version
        brokers = self._settings.brokers
        if key == API_VERSIONS:
            return cap_api_versions(body, version, self._supported)
        if key == METADATA:
            rules = self._rules()
            visible = None if rules is None or rules.allow_all else rules.topic_visible
            result = rewrite_metadata(body, version, visible, pending.denied_topics, brokers)
            self.topic_names.update(result.topic_ids)
            return result.body
        return rewrite_brokers(key, body, version, brokers)

    def _response_done(self, out: list) -> None:
        pending = self._pending.popleft()
        out.append(Record("RESPONSE", "FORWARDED", pending.api_key, pending.api_version,
                          pending.correlation_id, latency_ns=self._clock() - pending.started_ns))  # fmt: skip
        self._flush_synthetic(out)

    def _flush_synthetic(self, out: list) -> None:
        """Send denials whose turn has come (no forwarded request ahead of them)."""
        while self._pending and self._pending[0].synthetic is not None:
            out.append(ToClient(self._pending.popleft().synthetic))

    def _close(self, out: list, reason: str, detail: str, header: RequestHeader | None = None):
        self.closed = True
        if header is not None:
            out.append(Record("REQUEST", "ERROR", header.api_key, header.api_version,
                              header.correlation_id, header.client_id, reason=reason))  # fmt: skip
        else:
            out.append(Record("REQUEST", "ERROR", -1, -1, -1, reason=reason))
        out.append(Close(reason, detail))
        return out


def _topic_free(rules, key: int, version: int, header: RequestHeader) -> bool:
    """Whether some rule allows this API for any topic (then unknown topic ids are harmless)."""
    return rules.check(key, version, header.client_id, ["\x00any-topic\x00"]).allowed
