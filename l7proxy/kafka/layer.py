"""The Kafka connection logic without sockets: bytes in, commands out.

`KafkaLayer.client_data(bytes)` and `.upstream_data(bytes)` return a list of commands
(`ToUpstream`, `ToClient`, `Close`, `Record`). The asyncio session (session.py) carries them out;
tests drive the layer with plain bytes.

Requests are buffered one frame at a time (the policy needs every topic before the first byte goes
upstream) and forwarded as the same bytes; a large Produce is cut through as soon as its topics
are known and allowed. The response side (response_side.py) streams, inspects or rewrites
answers.

Kafka answers requests in order on a connection, so a synthesised denial waits in the same queue
as the forwarded requests and goes out when every earlier response has.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from l7proxy.kafka.commands import (
    Close,
    KafkaSettings,
    Pending,
    Record,
    ResolveTopicIds,
    ToClient,
    ToUpstream,
)
from l7proxy.kafka.fetch_sessions import FetchSessions
from l7proxy.kafka.response_side import ResponseSide
from l7proxy.kafka.topic_ids import LookupThrottle, TopicIdMap
from parsers.kafka import denials
from parsers.kafka.apis import API_TABLE, expects_response, topics_of
from parsers.kafka.codec import DecodeError, decode_bounded
from parsers.kafka.fastpath import Incomplete, produce_topics
from parsers.kafka.frames import (
    FrameDecoder,
    FrameError,
    RequestHeader,
    frame,
    parse_request_header,
)
from parsers.kafka.keys import (
    API_VERSIONS,
    CONSUMER_GROUP_HEARTBEAT,
    FETCH,
    FETCH_SESSION_ID_NOT_FOUND,
    METADATA,
    PRODUCE,
    TOPIC_AUTHORIZATION_FAILED,
    UNSUPPORTED_VERSION,
)
from parsers.kafka.responses import supported_versions

__all__ = [
    "Close",
    "KafkaLayer",
    "KafkaSettings",
    "Record",
    "ResolveTopicIds",
    "ToClient",
    "ToUpstream",
]

# Versions that may carry broker endpoints in tagged fields (KIP-951): a gateway caps below them
# so that clients only ever learn broker addresses from the responses it rewrites.
GATEWAY_CAPS = {PRODUCE: 9, FETCH: 15}
# Produce frames at least this large are forwarded before they are complete (cut-through);
# a frame whose topics are not yet readable is tried again after this many more bytes.
CUT_THROUGH_MIN = 64 * 1024
CUT_THROUGH_RETRY = 64 * 1024


class KafkaLayer:
    """One client connection: the request side lives here, the response side (`responses`) in
    response_side.py. `topic_ids` is the worker's shared map (a map of its own when None)."""

    def __init__(
        self,
        rules: Callable[[], object],
        settings: KafkaSettings = KafkaSettings(),
        clock_ns: Callable[[], int] = lambda: 0,
        topic_ids: TopicIdMap | None = None,
    ) -> None:
        self._rules = rules
        self._settings = settings
        self._clock = clock_ns
        self._requests = FrameDecoder(settings.max_frame_size)
        self._pending: deque[Pending] = deque()
        self._supported = supported_versions(GATEWAY_CAPS if settings.brokers else None)
        # Topic id -> name, learned from Metadata responses (topic_ids.py); the policy still
        # decides by name.
        self.topic_names = topic_ids if topic_ids is not None else TopicIdMap()
        self._req_left = 0  # bytes of a cut-through request still to pass on
        self._cut_tried = self._cut_tried_at = -1
        self.fetch_sessions = FetchSessions()
        # While the broker is asked about unknown topic ids: the waiting request's frame, the
        # whole frames behind it, then raw bytes not yet split (see ResolveTopicIds).
        self._resolving = False
        self._parked: deque[bytes] = deque()
        self._held: list[bytes] = []
        self._lookups = LookupThrottle()  # unknown topic ids asked about lately
        self.closed = False
        self.responses = ResponseSide(
            pending=self._pending, settings=settings, rules=rules, supported=self._supported,
            clock_ns=clock_ns, topic_ids=self.topic_names, fetch_sessions=self.fetch_sessions,
            close=self._close,
        )  # fmt: skip

    def upstream_data(self, data: bytes) -> list:
        """Bytes from the broker: see ResponseSide.upstream_data."""
        return self.responses.upstream_data(data)

    def pass_response_bytes(self, n: int) -> bool:
        return self.responses.pass_response_bytes(n)

    def learn_topic_ids(self, ids: dict[bytes, str]) -> None:
        """What the session's own lookup found (see ResolveTopicIds)."""
        self.topic_names.learn(ids)

    @property
    def in_flight(self) -> int:
        """Requests owed an answer, counting one waiting for a topic id lookup."""
        return len(self._pending) + self._resolving

    def pass_request_bytes(self, n: int) -> bool:
        """Fast path: True when `n` client bytes all belong to a request already decided and
        being cut through, so the caller may write them upstream as they are."""
        if self._req_left >= n and not self.closed:
            self._req_left -= n
            return True
        return False

    @property
    def request_bytes_left(self) -> int:
        """Bytes of the request being cut through that the client has not sent yet."""
        return 0 if self.closed else self._req_left

    # ---- client -> upstream -------------------------------------------------------------

    def client_data(self, data: bytes) -> list:
        if self.closed:
            return []
        if self._resolving:
            self._held.append(bytes(data))
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
        self._requests_in_order(frames, out)
        return out

    def _requests_in_order(self, frames, out: list) -> None:
        """Decide `frames` in order; stop where one waits for a topic id lookup (the rest
        waits behind it). Then try to cut through the partial frame after them."""
        for i, framed in enumerate(frames):
            self._request(framed, out)
            if self.closed:
                return
            if self._resolving:
                self._parked.extend(frames[i + 1 :])
                return
        self._cut_through(out)

    def topic_ids_resolved(self) -> list:
        """The session's lookup is over (whatever it found is in `topic_names`): decide the
        waiting request again (an id still unknown is denied), then everything behind it."""
        if not self._resolving or self.closed:
            return []
        self._resolving = False
        out: list = []
        frames = list(self._parked)
        self._parked.clear()
        self._requests_in_order(frames, out)
        if self._held and not self._resolving and not self.closed:
            held = b"".join(self._held)
            self._held.clear()
            out.extend(self.client_data(held))
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
        pending = Pending(header.correlation_id, PRODUCE, header.api_version,
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
        if key == API_VERSIONS and version > spec.versions[1]:
            self._unsupported_api_versions(header, spec, now, out)
            return
        if spec is None or not spec.versions[0] <= version <= spec.versions[1]:
            # No parser: only a policy without L7 restrictions lets it through.
            if rules is None or rules.allow_all:
                out.append(ToUpstream(framed))
                self._pending.append(Pending(header.correlation_id, key, version, False, now))
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
        pending = Pending(header.correlation_id, key, version, flexible, now)
        pending.filter_topics = (
            all_topics and key != METADATA and rules is not None and not rules.allow_all
        )
        if rules is None or rules.allow_all:
            self._forward(framed, header, request, pending, names, out)
            return
        verdict = rules.check(key, version, header.client_id, names)
        allowed = verdict.allowed
        if unknown_ids and allowed and not _topic_free(rules, key, version, header):
            # A topic id that no Metadata response seen here named: ask the broker, and decide
            # again when it answered; if it still is unknown, fail closed.
            if self._lookups.may_ask(unknown_ids, now):
                self._resolving = True
                self._parked.append(framed)
                out.append(ResolveTopicIds(tuple(unknown_ids)))
                return
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
        if allowed and key == FETCH and version >= 7:
            revoked = self.fetch_sessions.revoked_topic(rules, version, header.client_id)
            if revoked is not None:
                self._close(out, "fetch_session_denied",
                            f"policy changed: the fetch session holds denied topic {revoked}",
                            header)  # fmt: skip
                return
            epoch = request.get("session_epoch", -1)
            if epoch > 0 and not self.fetch_sessions.opened_here(request.get("session_id")):
                self._unknown_fetch_session(header, pending, out)
                return
            pending.learn_session = epoch == 0
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

    def _unknown_fetch_session(self, header: RequestHeader, pending, out: list) -> None:
        """An incremental Fetch (epoch > 0) continuing a session this connection did not open.
        Its partitions were checked where the session was opened, perhaps under a policy since
        revoked, and the broker serves them without their being named here: answer as a broker
        that does not know the session (FETCH_SESSION_ID_NOT_FOUND), and the client opens a new
        one here with a full Fetch naming every partition."""
        version = header.api_version
        answer = denials.fetch_session_not_found(header.correlation_id, version)
        out.append(Record("REQUEST", "DROPPED", FETCH, version, header.correlation_id,
                          header.client_id, error_code=FETCH_SESSION_ID_NOT_FOUND,
                          reason="FETCH_SESSION_NOT_OPENED_HERE"))  # fmt: skip
        self._answer_here(pending, answer, out)

    def _unsupported_api_versions(self, header: RequestHeader, spec, now: int, out: list) -> None:
        """A client opens with ApiVersions at its newest version. Newer than the proxy parses:
        answer as a broker that does not know it (UNSUPPORTED_VERSION, v0 body, the ApiVersions
        range supported), and the client retries at a version both understand."""
        answer = denials.unsupported_api_versions(header.correlation_id)
        out.append(Record("REQUEST", "ERROR", API_VERSIONS, header.api_version,
                          header.correlation_id, header.client_id, error_code=UNSUPPORTED_VERSION,
                          reason="unsupported_version"))  # fmt: skip
        pending = Pending(header.correlation_id, API_VERSIONS, header.api_version, False, now)
        self._answer_here(pending, answer, out)

    def _answer_here(self, pending: Pending, framed: bytes, out: list) -> None:
        """Answer `pending` with `framed` instead of the broker, in its turn behind the answers
        still owed (Kafka answers in order on a connection)."""
        pending.synthetic = framed
        self._pending.append(pending)
        self.responses.flush_answers(out)

    def _decode(self, spec, header: RequestHeader, framed: bytes) -> dict:
        codec = spec.request_codec(header.api_version)
        limit = self._settings.max_request_elements
        return decode_bounded(codec, memoryview(framed), header.body_offset, limit)[0]

    def _forward(self, framed, header: RequestHeader, request, pending, names, out) -> None:
        if header.api_key == FETCH and header.api_version >= 7:
            self.fetch_sessions.hold(names)
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
        self._answer_here(pending, response, out)

    def _metadata_subset(self, framed, header, request, pending, rules, out) -> None:
        """Forward Metadata for the allowed topics only; the denied ones come back as 29."""
        allowed, denied = [], []
        for topic in request["topics"]:
            name = topic.get("name") or self.topic_names.get(topic.get("topic_id"))
            ok = name is not None and rules.check(METADATA, header.api_version,
                                                  header.client_id, [name]).allowed  # fmt: skip
            (allowed if ok else denied).append(topic)
        if not allowed and header.api_version == 0:
            # v0 reads an empty list as "all topics". A broker's answer for denied topics
            # still lists its brokers (aiokafka drops a Metadata answer without brokers and
            # asks again until its request timeout): ask for all topics, show none of them.
            pending.only_denied = True
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

    def _close(self, out: list, reason: str, detail: str, header: RequestHeader | None = None):
        self.responses.stop(out)
        self.closed = True
        if header is not None:
            out.append(Record("REQUEST", "ERROR", header.api_key, header.api_version,
                              header.correlation_id, header.client_id, reason=reason,
                              closes=True))  # fmt: skip
        else:
            out.append(Record("REQUEST", "ERROR", -1, -1, -1, reason=reason, closes=True))
        out.append(Close(reason, detail))
        return out


def _topic_free(rules, key: int, version: int, header: RequestHeader) -> bool:
    """Whether some rule allows this API for any topic (then unknown topic ids are harmless)."""
    return rules.check(key, version, header.client_id, ["\x00any-topic\x00"]).allowed
