"""Sans-IO HTTP/2 for a policy-enforcing relay: frames, HPACK, gRPC framing, the relay itself."""

from parsers.http2.events import (
    ConnectionFailed,
    Decision,
    GoawayReceived,
    H2Limits,
    PrefaceReceived,
    RequestReceived,
    RequestRejected,
    StreamEnded,
)
from parsers.http2.headers import Request, encode_fields, upgrade_request_headers
from parsers.http2.relay import H2Relay

__all__ = [
    "ConnectionFailed",
    "Decision",
    "GoawayReceived",
    "H2Limits",
    "H2Relay",
    "PrefaceReceived",
    "Request",
    "RequestReceived",
    "RequestRejected",
    "StreamEnded",
    "encode_fields",
    "upgrade_request_headers",
]
