"""What the HTTP/2 relay reports to its session, and the limits it enforces."""

from __future__ import annotations

from dataclasses import dataclass

from parsers.http2.headers import Request


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Every bound of one relayed HTTP/2 connection (built from ProxyConfig by the session)."""

    # Streams a client may have open through the proxy; advertised as MAX_CONCURRENT_STREAMS
    # (the smaller of this and the server's value), excess streams get REFUSED_STREAM.
    max_concurrent_streams: int = 256
    # Largest frame accepted or relayed; SETTINGS_MAX_FRAME_SIZE is capped to it both ways, and
    # a client may send frames only as large as it was told (16 KiB until then, RFC 9113).
    max_frame_size: int = 16 * 1024
    # One header block (HEADERS + CONTINUATION), compressed bytes and frame count.
    max_header_block: int = 64 * 1024
    max_continuation_frames: int = 32
    # Decoded request header list (RFC 9113 6.5.2 accounting): above the soft limit the stream
    # gets 431, above the hard limit (an HPACK bomb) the connection is closed.
    max_header_list_size: int = 64 * 1024
    hard_header_list_size: int = 256 * 1024
    max_header_count: int = 128
    # Largest HPACK dynamic table the client may use for requests (SETTINGS_HEADER_TABLE_SIZE
    # from the server is capped to it).
    max_header_table_size: int = 64 * 1024
    # HPACK dynamic table the server may use for responses. 0 (the default) makes every response
    # block a pure function of its bytes, so the relay decodes each distinct block once instead of
    # Huffman-decoding every response in Python; the price is response header compression
    # between server and client (measured in docs/http2.md).
    response_header_table_size: int = 0
    # Flood budgets: token buckets refilled by `tick()` (once per second by the session).
    # Client resets of streams still in flight (rapid reset, CVE-2023-44487) and refused streams:
    reset_burst: int = 400
    reset_refill: int = 200
    # PING, SETTINGS, PRIORITY, empty DATA without END_STREAM, unknown frames:
    control_burst: int = 1000
    control_refill: int = 1000
    # Request body of a denied stream read and dropped (and credited back) before the relay
    # resets the stream with NO_ERROR.
    max_discarded_body: int = 64 * 1024 * 1024
    # Server DATA held back while the client's connection window is owed bytes the proxy
    # injected itself (local 403 bodies): bounded by those bodies, this is a safety cap.
    max_held_bytes: int = 1024 * 1024
    deny_body: bytes = b"Access denied\r\n"
    # How %2F, %5C and `\` in :path are read (parsers/http_path.py ESCAPED_SLASH_MODES).
    path_escaped_slashes: str = "unescape"
    grpc_deny_message: str = "Access denied"


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's answer for one request. `headers` replaces the forwarded header list when a
    rule rewrote it (header_actions); None forwards the request's own headers. `logged` names the
    headers a LOG mismatch action flagged (for the flow; values are never logged)."""

    allowed: bool
    headers: tuple[tuple[str, str], ...] | None = None
    logged: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class PrefaceReceived:
    """A valid client connection preface: the session may open the upstream connection."""


@dataclass(frozen=True, slots=True)
class RequestReceived:
    stream_id: int
    request: Request
    decision: Decision


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request answered by the proxy without asking the policy (malformed, too large, refused)."""

    stream_id: int
    reason: str
    error_code: int  # RST_STREAM code, or 0 when answered with a status
    status: int  # HTTP status sent, or 0


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """A stream the server answered is done (both sides ended, or it was reset). `status` is the
    final response status (0 when none came)."""

    stream_id: int
    status: int = 0
    grpc_status: str | None = None
    grpc_message: str | None = None
    reset_code: int | None = None
    reset_by: str | None = None  # "client", "server", "proxy"


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    """The relay closed the connection: `side` broke the protocol (or abused it)."""

    side: str  # "client" or "server"
    error_code: int
    reason: str


@dataclass(frozen=True, slots=True)
class GoawayReceived:
    side: str
    last_stream_id: int
    error_code: int
