"""Sans-IO Kafka: framing, request headers, the API table, topic extraction, denials, rewrites."""

from parsers.kafka.apis import API_TABLE, ApiSpec, Kind, TopicRefs, api_name, topics_of
from parsers.kafka.codec import DecodeError
from parsers.kafka.denials import code_for, error_response
from parsers.kafka.frames import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    FrameError,
    RequestHeader,
    parse_request_header,
)

__all__ = [
    "API_TABLE",
    "ApiSpec",
    "DEFAULT_MAX_FRAME_SIZE",
    "DecodeError",
    "FrameDecoder",
    "FrameError",
    "Kind",
    "RequestHeader",
    "TopicRefs",
    "api_name",
    "code_for",
    "error_response",
    "parse_request_header",
    "topics_of",
]
