"""The Kafka connection logic without sockets: bytes in, commands out.

`KafkaLayer.client_data(bytes)` and `.upstream_data(bytes)` return a list of commands
(`ToUpstream`, `ToClient`, `Close`, `Record`). The asyncio session (session.py) carries them out;
tests drive the layer with plain bytes.

Requests are buffered one frame at a time (the policy needs every topic before the first byte goes
upstream) and forwarded as the same bytes; a large Produce is cut through as soon as its topics
are known and allowed. Responses stream: after the 8-byte size + correlation id the rest is spliced
to the client as it arrives, except the few the proxy rewrites (ApiVersions, Metadata, "all topics"
answers, and in gateway mode FindCoordinator/DescribeCluster), which are buffered whole, and small
ones read in place for their error codes.

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
from parsers.kafka.fastpath import Incomplete, produce_topics
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
    error_codes,
    filter_topics,
    rewrite_brokers,
    rewrite_metadata,
    supported_versions,
)

_SIZE_CID = struct.Struct(">ii")
PRODUCE, FETCH = 0, 1
CONSUMER_GROUP_HEARTBEAT = 68
# Versions that may carry broker endpoints in tagged fields (KIP-951): a gateway caps below them
# so that clients only ever learn broker addresses from the responses it rewrites.
GATEWAY_CAPS = {PRODUCE: 9, FETCH: 15}
# Largest response streamed through; far above any fetch.max.bytes a client asks for.
MAX_RESPONSE_BYTES = 1 << 30
# Produce frames at least this large are forwarded before they are complete (cut-through);
# a frame whose topics are not yet readable is tried again after this many more bytes.
CUT_THROUGH_MIN = 64 * 1024
CUT_THROUGH_RETRY = 64 * 1024
MAX_TOPIC_IDS = 200_000
# Responses up to this size (other than Fetch) are read for their error codes.
INSPECT_LIMIT = 64 * 1024


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
    error_code: int = 0  # first non-zero error code seen in the response
    filter_topics: bool = False  # an "all topics" answer to filter by visibility


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    max_frame_size: int = 8 * 1024 * 1024
    # Kafka frames run to megabytes; with the HTTP-sized 256 KiB mark every produce request would
    # pause the client and throttle a pipelining producer. Buffers stay bounded by these marks.
    write_high_water: int = 4 * 1024 * 1024
    write_low_water: int = 1024 * 1024
    # Shared topic id -> name map (None: one per connection).
    topic_ids: dict | None = None
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
        # Topic id -> name, learned from Metadata responses. Ids are cluster-wide UUIDs and a
        # client often fetches on another connection than the one it asked Metadata on, so the
        # session shares one map per process (settings.topic_ids); the policy still decides by name.
        self.topic_names: dict[bytes, str] = (
            settings.topic_ids if settings.topic_ids is not None else {}
        )
        # Response side: bytes of the current response still to splice, or a buffered frame.
        self._resp_head = bytearray()
        self._resp_left = 0
        self._resp_buffer: bytearray | None = None
        self._resp_size = 0
        self._req_left = 0  # bytes of a cut-through request still to pass on
        self._cut_tried = self._cut_tried_at = -1
        self._view: memoryview | None = None
        self._run_start = self._run_stop = -1  # pass-through bytes of the current read
        self._pending_slices: list[tuple[int, int]] = []
        self.closed = False

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def pass_request_bytes(self, n: int) -> bool:
        """Fast path: True when `n` client bytes all belong to a request already decided and
        being cut through, so the caller may write them upstream as they are."""
        if self._req_left >= n and not self.closed:
            self._req_left -= n
            return True
        return False

    def pass_response_bytes(self, n: int) -> bool:
        """Fast path: True when `n` upstream bytes lie inside the response being spliced and do
        not finish it, so the caller may write them to the client as they are."""
        if self._resp_left > n and not self.closed:
            self._resp_left -= n
            return True
        return False

    # ---- client -> upstream -------------------------------------------------------------

    def client_data(self, data: bytes) -> list:
        if self.closed:
            return []
        out: list = []
        if self._req_left:
            # The rest of a request already decided and partly sent (cut-through).
            n = min(self._req_left, len(data))
            out.append(ToUpstream(data if n == len(data) else memoryview(data)[:n]))
            self._req_left -= n
            if n == len(data):
                return out
            data = data[n:]
        try:
            frames = self._requests.receive_data(data)
        except FrameError as exc:
            return self._close(out, exc.reason, str(exc))
        if frames:
            self._cut_tried = -1  # the frame tried before (if any) is complete
        for framed in frames:
            self._request(framed, out)
            if self.closed:
                return out
        self._cut_through(out)
        return out

    def _cut_through(self, out: list) -> None:
        """Start forwarding a large Produce before its last byte arrives, once its topics are
        known and allowed: the records after the last topic name need no inspection. Anything
        else (or a denial, which mirrors every partition) waits for the whole frame."""
        partial = self._requests.partial()
        if partial is None:
            return
        need, head = partial
        if need < CUT_THROUGH_MIN or len(head) < 64 or head[4:6] != b"\x00\x00":
            return
        if self._cut_tried == need and len(head) < self._cut_tried_at + CUT_THROUGH_RETRY:
            return
        self._cut_tried, self._cut_tried_at = need, len(head)
        spec = API_TABLE[PRODUCE]
        try:
            header = parse_request_header(head, spec.flexible_min, 4)
            if not spec.versions[0] <= header.api_version <= spec.versions[1]:
                return
            acks, names, ids = produce_topics(memoryview(head), header.body_offset,
                                              header.api_version,
                                              spec.flexible(header.api_version), prefix=True)  # fmt: skip
        except (FrameError, Incomplete):
            return
        if ids and any(i not in self.topic_names for i in ids):
            return
        names = names + [self.topic_names[i] for i in ids]
        rules = self._rules()
        if rules is not None and not rules.allow_all:
            if not rules.check(PRODUCE, header.api_version, header.client_id, names).allowed:
                return
        self._req_left = self._requests.detach()
        self._cut_tried = -1
        pending = _Pending(header.correlation_id, PRODUCE, header.api_version,
                           spec.flexible(header.api_version), self._clock())  # fmt: skip
        self._forward(head, header, {"acks": acks}, pending, names, out)

    def _request(self, framed: bytes, out: list) -> None:
        """One request frame (size prefix included): parse, decide, forward or answer."""
        now = self._clock()
        key = int.from_bytes(framed[4:6], "big", signed=True) if len(framed) >= 6 else -1
        spec = API_TABLE.get(key)
        try:
            header = parse_request_header(framed, spec.flexible_min if spec else None, 4)
        except FrameError as exc:
            self._close(out, exc.reason, str(exc))
            return
        version = header.api_version
        rules = self._rules()
        if spec is None or not spec.versions[0] <= version <= spec.versions[1]:
            # No parser: only a policy without L7 restrictions lets it through.
            if rules is None or rules.allow_all:
                out.append(ToUpstream(framed))
                self._pending.append(_Pending(header.correlation_id, key, version, False, now))
                out.append(Record("REQUEST", "FORWARDED", key, version, header.correlation_id,
                                  header.client_id))  # fmt: skip
                return
            self._close(out, "unsupported_api",
                        f"api {key} v{version} has no parser and the policy restricts Kafka",
                        header)  # fmt: skip
            return
        flexible = spec.flexible(version)
        all_topics = False
        request = None
        try:
            if key == PRODUCE:
                # Hot path: topic names and acks only; records are skipped by length.
                acks, names, ids = produce_topics(memoryview(framed), header.body_offset,
                                                  version, flexible)  # fmt: skip
                request = {"acks": acks}
            else:
                request = self._decode(spec, header, framed)
                refs = topics_of(key, version, request)
                names, ids, all_topics = list(refs.names), refs.ids, refs.all_topics
        except (DecodeError, KeyError, UnicodeDecodeError, IndexError) as exc:
            self._close(out, "malformed_request", f"{spec.spec_name} v{version}: {exc}", header)
            return
        unknown_ids = []
        for topic_id in ids:
            name = self.topic_names.get(topic_id)
            if name is None:
                unknown_ids.append(topic_id)
            else:
                names.append(name)
        pending = _Pending(header.correlation_id, key, version, flexible, now)
        pending.filter_topics = (
            all_topics and key != METADATA and rules is not None and not rules.allow_all
        )
        if rules is None or rules.allow_all:
            self._forward(framed, header, request, pending, names, out)
            return
        verdict = rules.check(key, version, header.client_id, names)
        allowed = verdict.allowed
        if unknown_ids and allowed and not _topic_free(rules, key, version, header):
            # A topic id that no Metadata response on this connection named: fail closed.
            allowed = False
        if (
            key == CONSUMER_GROUP_HEARTBEAT
            and request.get("subscribed_topic_regex")
            and allowed
            and not _topic_free(rules, key, version, header)
        ):
            # A regex subscription cannot be checked topic by topic: fail closed.
            unknown_ids.append(b"regex")
            allowed = False
        if allowed:
            self._forward(framed, header, request, pending, names, out)
            return
        if key == PRODUCE:
            try:
                full = self._decode(spec, header, framed)
            except (DecodeError, KeyError, UnicodeDecodeError) as exc:
                self._close(out, "malformed_request", f"Produce v{version}: {exc}", header)
                return
            request = {**full, "acks": request["acks"]}
        if key == METADATA and verdict.denied_topics and not all_topics:
            self._metadata_subset(framed, header, request, pending, rules, out)
            return
        topic_denied = bool(verdict.denied_topics) or (verdict.allowed and bool(unknown_ids))
        self._deny(spec, header, request, pending, names, out, topic_denied=topic_denied)

    @staticmethod
    def _decode(spec, header: RequestHeader, framed: bytes) -> dict:
        return spec.request_codec(header.api_version).decode(
            memoryview(framed), header.body_offset
        )[0]

    def _forward(self, framed, header: RequestHeader, request, pending, names, out) -> None:
        out.append(ToUpstream(framed))
        if expects_response(header.api_key, request):
            self._pending.append(pending)
        for topic in names or (None,):
            out.append(Record("REQUEST", "FORWARDED", header.api_key, header.api_version,
                              header.correlation_id, header.client_id, topic))  # fmt: skip

    def _deny(self, spec, header, request, pending, names, out, topic_denied) -> None:
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

    def _metadata_subset(self, framed, header, request, pending, rules, out) -> None:
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
            self._deny(API_TABLE[METADATA], header, request, pending, names, out, True)
            return
        for topic in allowed:
            out.append(Record("REQUEST", "FORWARDED", METADATA, header.api_version,
                              header.correlation_id, header.client_id, topic.get("name")))  # fmt: skip
        for topic in denied:
            out.append(Record("REQUEST", "DROPPED", METADATA, header.api_version,
                              header.correlation_id, header.client_id, topic.get("name"),
                              TOPIC_AUTHORIZATION_FAILED, reason="POLICY_DENIED"))  # fmt: skip
        body = bytearray(framed[4 : header.body_offset])
        API_TABLE[METADATA].request_codec(header.api_version).encode(
            body, {**request, "topics": allowed}
        )
        pending.denied_topics = tuple((t.get("name"), t.get("topic_id")) for t in denied)
        out.append(ToUpstream(frame(body)))
        self._pending.append(pending)

    # ---- upstream -> client -------------------------------------------------------------

    def upstream_data(self, data: bytes) -> list:
        """Splice responses through; consecutive pass-through bytes of one read go out as one
        slice (one write), so many small responses in a read cost a single send."""
        if self.closed:
            return []
        out: list = []
        view = self._view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end and not self.closed:
            if self._resp_left:
                n = min(self._resp_left, end - pos)
                self._emit(pos, pos + n)
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
            if not self._resp_head and end - pos >= 8:
                head_at = pos  # the common case: the size and correlation id are in this read
            else:
                need = 8 - len(self._resp_head)
                self._resp_head += view[pos : pos + need]
                pos += min(need, end - pos)
                if len(self._resp_head) < 8:
                    continue
                head_at = -1
            pos = self._response_start(out, head_at, pos)
        self._flush_run(out)
        self._view = None
        return out

    def _emit(self, start: int, stop: int) -> None:
        if self._run_stop == start:
            self._run_stop = stop
            return
        if self._run_stop >= 0:
            self._pending_slices.append((self._run_start, self._run_stop))
        self._run_start, self._run_stop = start, stop

    def _flush_run(self, out: list) -> None:
        """Put the pass-through bytes gathered so far ahead of any other command."""
        view = self._view
        for a, b in self._pending_slices:
            out.append(ToClient(view[a:b]))
        self._pending_slices.clear()
        if self._run_stop >= 0:
            out.append(ToClient(view[self._run_start : self._run_stop]))
            self._run_start = self._run_stop = -1

    def _response_start(self, out: list, head_at: int, pos: int) -> int:
        """Read a response's size + correlation id (in the read at `head_at`, or buffered when
        -1); return where reading continues."""
        if head_at >= 0:
            size, correlation_id = _SIZE_CID.unpack_from(self._view, head_at)
            pos = head_at + 8
        else:
            size, correlation_id = _SIZE_CID.unpack(self._resp_head)
        try:
            check_size(size, MAX_RESPONSE_BYTES)
            if size < 4:
                raise FrameError("short_response", f"response of {size} bytes")
        except FrameError as exc:
            self._close(out, exc.reason, f"upstream: {exc}")
            return pos
        if not self._pending or self._pending[0].synthetic is not None:
            self._close(out, "unexpected_response",
                        f"upstream sent correlation id {correlation_id} with none pending")  # fmt: skip
            return pos
        pending = self._pending[0]
        if pending.correlation_id != correlation_id:
            self._close(out, "correlation_mismatch",
                        f"upstream answered {correlation_id}, expected {pending.correlation_id}")  # fmt: skip
            return pos
        if self._rewrites(pending) or self._inspects(pending, size):
            frame_end = head_at + 4 + size
            if head_at >= 0 and frame_end <= len(self._view):
                # The whole response is in this read: look at it in place.
                self._resp_head.clear()
                self._finish_read_response(out, self._view[head_at:frame_end], head_at)
                return frame_end
            head = bytes(self._view[head_at:pos]) if head_at >= 0 else bytes(self._resp_head)
            self._resp_head.clear()
            self._resp_size = size + 4
            self._resp_buffer = bytearray(head)
            if size == 4:
                self._rewrite_response(out)
            return pos
        head = bytes(self._view[head_at:pos]) if head_at >= 0 else bytes(self._resp_head)
        self._resp_head.clear()
        if head_at >= 0:
            self._emit(head_at, pos)
        else:
            self._flush_run(out)
            out.append(ToClient(head))
        self._resp_left = size - 4
        if not self._resp_left:
            self._response_done(out)
        return pos

    def _rewrites(self, pending: _Pending) -> bool:
        key = pending.api_key
        if key == API_VERSIONS or key == METADATA or pending.filter_topics:
            return True
        return bool(self._settings.brokers) and key in (FIND_COORDINATOR, DESCRIBE_CLUSTER)

    def _inspects(self, pending: _Pending, size: int) -> bool:
        """Small responses are buffered to read their error codes (the flows and metrics carry
        them); Fetch and anything large stream through unread."""
        return (
            size <= INSPECT_LIMIT
            and pending.api_key != FETCH
            and pending.api_key in API_TABLE
            and pending.api_version <= API_TABLE[pending.api_key].versions[1]
        )

    def _rewrite_response(self, out: list) -> None:
        framed = bytes(self._resp_buffer)
        self._resp_buffer = None
        self._finish_read_response(out, framed, -1)

    def _finish_read_response(self, out: list, framed, at: int) -> None:
        """A response read whole: rewrite or inspect it, then send it (in place when `at` is its
        offset in the current read and nothing changed)."""
        pending = self._pending[0]
        try:
            start = response_header_size(pending.api_key, pending.flexible, framed, 8)
            body = self._new_body(pending, bytes(framed[start:]))
        except (DecodeError, FrameError, KeyError, TypeError, UnicodeDecodeError) as exc:
            self._close(out, "malformed_response", f"api {pending.api_key}: {exc}")
            return
        if body is None and at >= 0:
            self._emit(at, at + len(framed))
        else:
            self._flush_run(out)
            out.append(ToClient(framed if body is None else frame(bytes(framed[4:start]) + body)))
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
            if len(self.topic_names) > MAX_TOPIC_IDS:
                self.topic_names.clear()  # bounded; Metadata responses refill it
            self.topic_names.update(result.topic_ids)
            return result.body
        if brokers and key in (FIND_COORDINATOR, DESCRIBE_CLUSTER):
            return rewrite_brokers(key, body, version, brokers)
        if pending.filter_topics:
            rules = self._rules()
            if rules is not None and not rules.allow_all:
                return filter_topics(key, body, version, rules.topic_visible)
            return None
        try:
            value, _ = API_TABLE[key].response_codec(version).decode(memoryview(body), 0)
        except (DecodeError, KeyError, UnicodeDecodeError):
            return None  # inspection is best effort; the bytes go through as they are
        codes = error_codes(value)
        pending.error_code = codes[0] if codes else 0
        return None

    def _response_done(self, out: list) -> None:
        pending = self._pending.popleft()
        out.append(Record("RESPONSE", "FORWARDED", pending.api_key, pending.api_version,
                          pending.correlation_id, error_code=pending.error_code,
                          latency_ns=self._clock() - pending.started_ns))  # fmt: skip
        self._flush_synthetic(out)

    def _flush_synthetic(self, out: list) -> None:
        """Send denials whose turn has come (no forwarded request ahead of them)."""
        while self._pending and self._pending[0].synthetic is not None:
            if self._view is not None:
                self._flush_run(out)
            out.append(ToClient(self._pending.popleft().synthetic))

    def _close(self, out: list, reason: str, detail: str, header: RequestHeader | None = None):
        if self._view is not None:
            self._flush_run(out)
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
