"""Synthesised error responses: the answer the proxy sends for a denied request.

The response mirrors the request (every topic and partition, every group or resource) and puts the
authorization error code in every error field, encoded at the request's version with the right
header (flexible or not). Fields not set here take their spec defaults. `error_response` returns
None when an API's response has nowhere to carry an error; the caller then closes the connection.
"""

from __future__ import annotations

from parsers.kafka import denial_resources as other
from parsers.kafka import denial_topics as topic
from parsers.kafka.apis import API_TABLE, ApiSpec
from parsers.kafka.denial_topics import Builder
from parsers.kafka.frames import encode_response_header, frame
from parsers.kafka.keys import (
    API_VERSIONS,
    CLUSTER_AUTHORIZATION_FAILED,
    COORDINATOR_TRANSACTION,
    FETCH,
    FETCH_SESSION_ID_NOT_FOUND,
    FIND_COORDINATOR,
    INIT_PRODUCER_ID,
    TOPIC_AUTHORIZATION_FAILED,
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    UNSUPPORTED_VERSION,
)

BUILDERS: dict[int, Builder] = {
    0: topic.produce,
    1: topic.fetch,
    2: topic.list_offsets,
    3: topic.metadata,
    8: topic.topic_partitions("name", "topics", "partitions", "partition_index"),
    9: topic.offset_fetch,
    10: other.find_coordinator,
    13: other.leave_group,
    15: other.describe_groups,
    19: topic.create_topics,
    20: topic.delete_topics,
    21: topic.topic_partitions("name", "topics", "partitions", "partition_index"),
    23: topic.topic_partitions(
        "topic", "topics", "partitions", "partition", "partitions", "partition"
    ),
    24: topic.add_partitions_to_txn,
    27: topic.write_txn_markers,
    28: topic.topic_partitions("name", "topics", "partitions", "partition_index"),
    30: other.per_item("results", "creations", lambda x, c: {"error_code": c}),
    31: other.per_item(
        "filter_results", "filters", lambda x, c: {"error_code": c, "matching_acls": []}
    ),
    32: other.resources("results"),
    33: other.resources("responses"),
    34: topic.alter_replica_log_dirs,
    37: topic.create_partitions,
    42: other.delete_groups,
    44: other.resources("responses"),
    47: topic.offset_delete,
    49: other.per_item("entries", "entries", lambda x, c: {"error_code": c, "entity": x["entity"]}),
    51: lambda v, req, c: {
        "results": [
            {"user": u["name"], "error_code": c}
            for u in (req.get("deletions") or []) + (req.get("upsertions") or [])
        ]
    },
    61: topic.describe_producers,
    65: other.txn_states,
    75: topic.describe_topic_partitions,
}


def response_body(spec: ApiSpec, version: int, request: dict, code: int) -> dict | None:
    """The response as a dict, or None when this API at this version has no error field."""
    builder = BUILDERS.get(spec.key)
    if builder is not None:
        try:
            return builder(version, request, code)
        except (TypeError, KeyError, AttributeError):
            pass  # a null where the request should list items: answer at the top level if we can
    codec = spec.response_codec(version)
    if "error_code" in codec.names:
        return {"error_code": code}
    return None


def error_response(
    spec: ApiSpec, version: int, correlation_id: int, request: dict, code: int
) -> bytes | None:
    """The framed response (size prefix, header, body) or None if it cannot be expressed."""
    body = response_body(spec, version, request, code)
    if body is None:
        return None
    flexible = spec.flexible(version)
    out = bytearray(encode_response_header(correlation_id, spec.key, flexible))
    # Clients read an ApiVersions response that carries an error as v0, whatever they asked for.
    body_version = 0 if spec.key == API_VERSIONS else version
    spec.response_codec(body_version).encode(out, body)
    return frame(out)


def fetch_session_not_found(correlation_id: int, version: int) -> bytes:
    """An incremental Fetch of a session the broker does not know (here: one this connection
    did not open): FETCH_SESSION_ID_NOT_FOUND, no partitions; the client opens a new one."""
    spec = API_TABLE[FETCH]
    out = bytearray(encode_response_header(correlation_id, FETCH, spec.flexible(version)))
    spec.response_codec(version).encode(
        out, {"error_code": FETCH_SESSION_ID_NOT_FOUND, "session_id": 0, "responses": []}
    )
    return frame(out)


def unsupported_api_versions(correlation_id: int) -> bytes:
    """ApiVersions at a version newer than the proxy parses: what a broker answers then
    (UNSUPPORTED_VERSION in the v0 layout, with the ApiVersions range it takes); the client
    retries at a version both understand."""
    spec = API_TABLE[API_VERSIONS]
    out = bytearray(encode_response_header(correlation_id, API_VERSIONS, False))
    spec.response_codec(0).encode(out, {
        "error_code": UNSUPPORTED_VERSION,
        "api_keys": [{"api_key": API_VERSIONS, "min_version": 0,
                      "max_version": spec.versions[1]}],
    })  # fmt: skip
    return frame(out)


def code_for(spec: ApiSpec, topic_denied: bool, request: dict | None = None) -> int:
    """The authorization error for a denial: topic first, else by the API's kind."""
    if topic_denied:
        return TOPIC_AUTHORIZATION_FAILED
    if spec.key == FIND_COORDINATOR and request is not None:
        if request.get("key_type") == COORDINATOR_TRANSACTION:
            return TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    if (
        spec.key == INIT_PRODUCER_ID
        and request is not None
        and request.get("transactional_id") is None
    ):
        return CLUSTER_AUTHORIZATION_FAILED  # idempotent producer id, not a transaction
    return spec.kind.value


__all__ = ["API_TABLE", "BUILDERS", "code_for", "error_response", "response_body"]
