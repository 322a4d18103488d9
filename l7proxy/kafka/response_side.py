"""The response side of a Kafka connection: pass through, inspect or rewrite what the broker
sends, and put the proxy's own answers in their turn.

Responses stream: after the 8-byte size + correlation id the rest is spliced to the client as it
arrives, and all pass-through bytes of one read leave as one slice. Responses the proxy rewrites
(ApiVersions, Metadata, "all topics" answers, and in gateway mode FindCoordinator/DescribeCluster)
are read whole; small ones are read in place for their error codes. Synthesised denials wait in
the same queue, so answers keep the order of the requests.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable

from l7proxy.kafka.commands import KafkaSettings, Pending, Record, ToClient
from l7proxy.kafka.fetch_sessions import FetchSessions
from l7proxy.kafka.topic_ids import TopicIdMap
from parsers.kafka.apis import API_TABLE
from parsers.kafka.codec import DecodeError
from parsers.kafka.fastpath import produce_response_error
from parsers.kafka.frames import FrameError, check_size, frame, response_header_size
from parsers.kafka.keys import (
    API_VERSIONS,
    DESCRIBE_CLUSTER,
    FETCH,
    FIND_COORDINATOR,
    METADATA,
    PRODUCE,
)
from parsers.kafka.responses import (
    cap_api_versions,
    error_codes,
    filter_topics,
    rewrite_brokers,
    rewrite_metadata,
)

_SIZE_CID = struct.Struct(">ii")
# Largest response streamed through; far above any fetch.max.bytes a client asks for.
MAX_RESPONSE_BYTES = 1 << 30
# Responses up to this size (other than Fetch) are read for their error codes.
INSPECT_LIMIT = 64 * 1024
# Fetch v7+ response head after the correlation id (and header tags): throttle_time_ms,
# error_code, session_id. SESSION_PEEK bytes cover it behind any sane tag section.
_FETCH_HEAD = struct.Struct(">ihi")
SESSION_PEEK = 64


def _nothing(_topic: str) -> bool:
    return False


class ResponseSide:
    """The broker -> client half of one KafkaLayer. It shares the queue of answers owed with the
    request side (`pending`: the request side appends, this side answers and pops, in order)
    and the connection's fetch session ids (this side learns them from the answers, the request
    side checks incremental Fetches against them). `close(out, reason, detail)` is the layer's
    close; it calls `stop()` here."""

    def __init__(
        self,
        *,
        pending: deque[Pending],
        settings: KafkaSettings,
        rules: Callable[[], object],
        supported: dict,
        clock_ns: Callable[[], int],
        topic_ids: TopicIdMap,
        fetch_sessions: FetchSessions,
        close: Callable[[list, str, str], object],
    ) -> None:
        self._pending = pending
        self._settings = settings
        self._rules = rules
        self._supported = supported  # the ApiVersions cap
        self._clock = clock_ns
        self._topic_ids = topic_ids
        self._fetch_sessions = fetch_sessions
        self._close = close
        self.closed = False
        self._resp_head = bytearray()  # a response header split across reads
        self._resp_left = 0  # bytes of the current response still to splice
        # The first bytes of a spliced Fetch response that opens a fetch session (its id is
        # in them), gathered as they pass; None when not looking.
        self._peek: bytearray | None = None
        self._peek_need = 0
        self._resp_buffer: bytearray | None = None  # a response read whole
        self._resp_size = 0
        self._view: memoryview | None = None  # the read being processed
        self._run_start = self._run_stop = -1  # pass-through bytes of the current read
        self._pending_slices: list[tuple[int, int]] = []

    def stop(self, out: list) -> None:
        """The connection closes: what passed through so far goes out first, nothing after."""
        if self._view is not None:
            self._flush_run(out)
        self.closed = True

    def pass_response_bytes(self, n: int) -> bool:
        """Fast path: True when `n` upstream bytes lie inside the response being spliced and do
        not finish it, so the caller may write them to the client as they are."""
        if self._resp_left > n and self._peek is None and not self.closed:
            self._resp_left -= n
            return True
        return False

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
                if self._peek is not None:
                    self._peek_at(self._view[pos : pos + n])
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
        if pending.learn_session:
            # Header tags (flexible), throttle_time_ms, error_code, session_id: a few bytes.
            self._peek = bytearray()
            self._peek_need = min(size - 4, SESSION_PEEK)
        if not self._resp_left:
            self._response_done(out)
        return pos

    def _rewrites(self, pending: Pending) -> bool:
        key = pending.api_key
        if key == API_VERSIONS or key == METADATA or pending.filter_topics:
            return True
        return bool(self._settings.brokers) and key in (FIND_COORDINATOR, DESCRIBE_CLUSTER)

    def _inspects(self, pending: Pending, size: int) -> bool:
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

    def _new_body(self, pending: Pending, body: bytes) -> bytes | None:
        key, version = pending.api_key, pending.api_version
        brokers = self._settings.brokers
        if key == API_VERSIONS:
            return cap_api_versions(body, version, self._supported)
        if key == METADATA:
            rules = self._rules()
            visible = None if rules is None or rules.allow_all else rules.topic_visible
            if pending.only_denied:
                visible = _nothing
            result = rewrite_metadata(body, version, visible, pending.denied_topics, brokers)
            self._topic_ids.learn(result.topic_ids)
            return result.body
        if brokers and key in (FIND_COORDINATOR, DESCRIBE_CLUSTER):
            return rewrite_brokers(key, body, version, brokers)
        if pending.filter_topics:
            rules = self._rules()
            if rules is not None and not rules.allow_all:
                return filter_topics(key, body, version, rules.topic_visible)
            return None
        if key == PRODUCE:
            # The hot response: its error codes without the generic codec.
            try:
                pending.error_code = produce_response_error(body, 0, version, pending.flexible)
            except DecodeError:
                pass  # inspection is best effort; the bytes go through as they are
            return None
        try:
            value, _ = API_TABLE[key].response_codec(version).decode(memoryview(body), 0)
        except (DecodeError, KeyError, UnicodeDecodeError):
            return None  # inspection is best effort; the bytes go through as they are
        codes = error_codes(value)
        pending.error_code = codes[0] if codes else 0
        return None

    def _peek_at(self, chunk) -> None:
        """Gather the head of a session-opening Fetch response; once there, learn its id."""
        peek = self._peek
        peek += chunk[: self._peek_need - len(peek)]
        if len(peek) < self._peek_need:
            return
        self._peek = None
        try:
            at = response_header_size(FETCH, self._pending[0].flexible, peek, 0)
            _, error_code, session_id = _FETCH_HEAD.unpack_from(peek, at)
        except (FrameError, IndexError, struct.error):
            return  # unreadable: the session stays unknown here (its next Fetch gets 70)
        if error_code == 0 and session_id:
            self._fetch_sessions.learn(session_id)

    def _response_done(self, out: list) -> None:
        self._peek = None  # a response shorter than the peek: nothing learned
        pending = self._pending.popleft()
        out.append(Record("RESPONSE", "FORWARDED", pending.api_key, pending.api_version,
                          pending.correlation_id, error_code=pending.error_code,
                          latency_ns=self._clock() - pending.started_ns))  # fmt: skip
        self.flush_answers(out)

    def flush_answers(self, out: list) -> None:
        """Send the proxy's own answers whose turn has come (no forwarded request ahead)."""
        while self._pending and self._pending[0].synthetic is not None:
            if self._view is not None:
                self._flush_run(out)
            out.append(ToClient(self._pending.popleft().synthetic))
