"""Synthesised error responses: the answer the proxy sends for a denied request.

The response mirrors the request (every topic and partition, every group or resource) and puts the
authorization error code in every error field, encoded at the request's version with the right
header (flexible or not). Fields not set here take their spec defaults. `error_response` returns
None when an API's response has nowhere to carry an error; the caller then closes the connection.
"""

from __future__ import annotations

from collections.abc import Callable

from parsers.kafka.apis import (
    API_TABLE,
    CLUSTER_AUTHORIZATION_FAILED,
    GROUP_AUTHORIZATION_FAILED,
    RESOURCE_GROUP,
    RESOURCE_TOPIC,
    TOPIC_AUTHORIZATION_FAILED,
    TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    ApiSpec,
)
from parsers.kafka.frames import API_VERSIONS, encode_response_header, frame

Builder = Callable[[int, dict, int], dict]


def _parts(items, key="partitions", index="partition_index") -> list[int]:
    """Partition indexes of a request topic: a list of ints or of partition structs."""
    parts = items.get(key) or []
    return [p if isinstance(p, int) else p[index] for p in parts]


def _produce(v, req, code):
    return {
        "responses": [
            {
                "name": t.get("name", ""),
                "topic_id": t.get("topic_id"),
                "partition_responses": [
                    {
                        "index": p["index"],
                        "error_code": code,
                        "base_offset": -1,
                        "log_append_time_ms": -1,
                        "log_start_offset": -1,
                    }  # fmt: skip
                    for p in t["partition_data"]
                ],
            }
            for t in req["topic_data"]
        ]
    }


def _fetch(v, req, code):
    return {
        "error_code": 0,
        "session_id": 0,
        "responses": [
            {
                "topic": t.get("topic", ""),
                "topic_id": t.get("topic_id"),
                "partitions": [
                    {
                        "partition_index": p["partition"],
                        "error_code": code,
                        "high_watermark": -1,
                        "last_stable_offset": -1,
                        "log_start_offset": -1,
                        "preferred_read_replica": -1,
                        "aborted_transactions": None,
                        # Empty, not null: librdkafka rejects a null record set as a parse
                        # failure ("invalid MessageSetSize -1") and never reports the error.
                        "records": b"",
                    }  # fmt: skip
                    for p in t["partitions"]
                ],
            }
            for t in req["topics"]
        ],
    }


def _list_offsets(v, req, code):
    return {
        "topics": [
            {
                "name": t["name"],
                "partitions": [
                    {
                        "partition_index": i,
                        "error_code": code,
                        "timestamp": -1,
                        "offset": -1,
                        "leader_epoch": -1,
                    }  # fmt: skip
                    for i in _parts(t)
                ],
            }
            for t in req["topics"]
        ]
    }


def _metadata(v, req, code):
    return {
        "brokers": [],
        "cluster_id": None,
        "controller_id": -1,
        "topics": [
            {
                "error_code": code,
                "name": t.get("name"),
                "topic_id": t.get("topic_id"),
                "partitions": [],
                "topic_authorized_operations": -2147483648,
            }  # fmt: skip
            for t in req.get("topics") or []
        ],
        "cluster_authorized_operations": -2147483648,
        "error_code": 0,
    }


def _topic_partitions(topic_key: str, resp_key: str, parts_key: str, index_key: str,
                      req_parts: str = "partitions", req_index: str = "partition_index",
                      ) -> Builder:  # fmt: skip
    """Topics -> partitions -> {index, error_code}: OffsetCommit, TxnOffsetCommit, DeleteRecords..."""

    def build(v, req, code):
        return {
            resp_key: [
                {
                    topic_key: t.get(topic_key, t.get("name", "")),
                    "name": t.get("name", ""),
                    "topic_id": t.get("topic_id"),
                    parts_key: [
                        {
                            index_key: i,
                            "error_code": code,
                            "partition_error_code": code,
                            "low_watermark": -1,
                            "leader_epoch": -1,
                            "end_offset": -1,
                            "committed_offset": -1,
                            "committed_leader_epoch": -1,
                            "metadata": "",
                        }  # fmt: skip
                        for i in _parts(t, req_parts, req_index)
                    ],
                }
                for t in req.get("topics") or []
            ]
        }

    return build


def _offset_fetch(v, req, code):
    def topics(ts):
        return [
            {
                "name": t.get("name", ""),
                "topic_id": t.get("topic_id"),
                "partitions": [
                    {
                        "partition_index": i,
                        "committed_offset": -1,
                        "committed_leader_epoch": -1,
                        "metadata": "",
                        "error_code": code,
                    }  # fmt: skip
                    for i in t.get("partition_indexes") or []
                ],
            }
            for t in ts or []
        ]

    if v <= 7:
        # A null topic list asks for every committed offset of the group: a group-level error.
        top = code if req.get("topics") is None else 0
        return {"topics": topics(req.get("topics")), "error_code": top}
    return {
        "groups": [
            {
                "group_id": g["group_id"],
                "topics": topics(g.get("topics")),
                "error_code": code if g.get("topics") is None else 0,
            }  # fmt: skip
            for g in req["groups"]
        ]
    }


def _find_coordinator(v, req, code):
    if v <= 3:
        return {"error_code": code, "error_message": None, "node_id": -1, "host": "", "port": -1}
    return {
        "coordinators": [
            {"key": k, "node_id": -1, "host": "", "port": -1, "error_code": code}
            for k in req["coordinator_keys"]
        ]
    }


def _create_topics(v, req, code):
    return {
        "topics": [
            {
                "name": t["name"],
                "error_code": code,
                "num_partitions": -1,
                "replication_factor": -1,
                "configs": None,
            }  # fmt: skip
            for t in req["topics"]
        ]
    }


def _delete_topics(v, req, code):
    if v <= 5:
        return {"responses": [{"name": n, "error_code": code} for n in req["topic_names"]]}
    return {
        "responses": [
            {"name": t.get("name"), "topic_id": t.get("topic_id"), "error_code": code}
            for t in req["topics"]
        ]
    }


def _add_partitions_to_txn(v, req, code):
    def topics(ts):
        return [
            {
                "name": t["name"],
                "results_by_partition": [
                    {"partition_index": i, "partition_error_code": code} for i in t["partitions"]
                ],
            }  # fmt: skip
            for t in ts
        ]

    if v <= 3:
        return {"results_by_topic_v3_and_below": topics(req["v3_and_below_topics"])}
    return {
        "error_code": 0,
        "results_by_transaction": [
            {"transactional_id": t["transactional_id"], "topic_results": topics(t["topics"])}
            for t in req["transactions"]
        ],
    }


def _resource_code(code: int) -> Callable[[int], int]:
    """Config APIs: topic resources get the topic error, groups and brokers their own."""

    def for_type(resource_type: int) -> int:
        if code != TOPIC_AUTHORIZATION_FAILED:
            return code
        if resource_type == RESOURCE_TOPIC:
            return TOPIC_AUTHORIZATION_FAILED
        if resource_type == RESOURCE_GROUP:
            return GROUP_AUTHORIZATION_FAILED
        return CLUSTER_AUTHORIZATION_FAILED

    return for_type


def _resources(resp_key: str) -> Builder:
    def build(v, req, code):
        pick = _resource_code(code)
        return {
            resp_key: [
                {
                    "error_code": pick(r["resource_type"]),
                    "error_message": None,
                    "resource_type": r["resource_type"],
                    "resource_name": r["resource_name"],
                    "configs": [],
                }  # fmt: skip
                for r in req["resources"]
            ]
        }

    return build


def _create_partitions(v, req, code):
    return {"results": [{"name": t["name"], "error_code": code} for t in req["topics"]]}


def _describe_producers(v, req, code):
    return {
        "topics": [
            {
                "name": t["name"],
                "partitions": [
                    {"partition_index": i, "error_code": code} for i in t["partition_indexes"]
                ],
            }  # fmt: skip
            for t in req["topics"]
        ]
    }


def _describe_topic_partitions(v, req, code):
    return {
        "topics": [
            {
                "error_code": code,
                "name": t["name"],
                "partitions": [],
                "topic_authorized_operations": -2147483648,
            }  # fmt: skip
            for t in req["topics"]
        ],
        "next_cursor": None,
    }


def _describe_groups(v, req, code):
    return {
        "groups": [
            {
                "error_code": code,
                "group_id": g,
                "group_state": "",
                "protocol_type": "",
                "protocol_data": "",
                "members": [],
                "authorized_operations": -2147483648,
            }  # fmt: skip
            for g in req["groups"]
        ]
    }


def _delete_groups(v, req, code):
    return {"results": [{"group_id": g, "error_code": code} for g in req["groups_names"]]}


def _offset_delete(v, req, code):
    return {
        "error_code": 0,
        "topics": [
            {
                "name": t["name"],
                "partitions": [
                    {"partition_index": p["partition_index"], "error_code": code}
                    for p in t["partitions"]
                ],
            }  # fmt: skip
            for t in req["topics"]
        ],
    }


def _leave_group(v, req, code):
    return {
        "error_code": code,
        "members": [
            {
                "member_id": m["member_id"],
                "group_instance_id": m.get("group_instance_id"),
                "error_code": code,
            }  # fmt: skip
            for m in req.get("members") or []
        ],
    }


def _per_item(resp_key: str, req_key: str, item: Callable[[dict, int], dict]) -> Builder:
    def build(v, req, code):
        return {resp_key: [item(x, code) for x in req.get(req_key) or []]}

    return build


def _txn_states(v, req, code):
    return {
        "transaction_states": [
            {
                "error_code": code,
                "transactional_id": t,
                "transaction_state": "",
                "transaction_timeout_ms": -1,
                "transaction_start_time_ms": -1,
                "producer_id": -1,
                "producer_epoch": -1,
                "topics": [],
            }  # fmt: skip
            for t in req["transactional_ids"]
        ]
    }


def _write_txn_markers(v, req, code):
    return {
        "markers": [
            {
                "producer_id": m["producer_id"],
                "topics": [
                    {
                        "name": t["name"],
                        "partitions": [
                            {"partition_index": i, "error_code": code}
                            for i in t["partition_indexes"]
                        ],
                    }
                    for t in m["topics"]
                ],
            }  # fmt: skip
            for m in req["markers"]
        ]
    }


def _alter_replica_log_dirs(v, req, code):
    return {
        "results": [
            {
                "topic_name": t["name"],
                "partitions": [{"partition_index": i, "error_code": code} for i in t["partitions"]],
            }  # fmt: skip
            for d in req["dirs"]
            for t in d["topics"]
        ]
    }


BUILDERS: dict[int, Builder] = {
    0: _produce,
    1: _fetch,
    2: _list_offsets,
    3: _metadata,
    8: _topic_partitions("name", "topics", "partitions", "partition_index"),
    9: _offset_fetch,
    10: _find_coordinator,
    13: _leave_group,
    15: _describe_groups,
    19: _create_topics,
    20: _delete_topics,
    21: _topic_partitions("name", "topics", "partitions", "partition_index"),
    23: _topic_partitions("topic", "topics", "partitions", "partition", "partitions", "partition"),
    24: _add_partitions_to_txn,
    27: _write_txn_markers,
    28: _topic_partitions("name", "topics", "partitions", "partition_index"),
    30: _per_item("results", "creations", lambda x, c: {"error_code": c}),
    31: _per_item("filter_results", "filters", lambda x, c: {"error_code": c, "matching_acls": []}),
    32: _resources("results"),
    33: _resources("responses"),
    34: _alter_replica_log_dirs,
    37: _create_partitions,
    42: _delete_groups,
    44: _resources("responses"),
    47: _offset_delete,
    49: _per_item("entries", "entries", lambda x, c: {"error_code": c, "entity": x["entity"]}),
    51: lambda v, req, c: {
        "results": [
            {"user": u["name"], "error_code": c}
            for u in (req.get("deletions") or []) + (req.get("upsertions") or [])
        ]
    },
    61: _describe_producers,
    65: _txn_states,
    75: _describe_topic_partitions,
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


def code_for(spec: ApiSpec, topic_denied: bool, request: dict | None = None) -> int:
    """The authorization error for a denial: topic first, else by the API's kind."""
    if topic_denied:
        return TOPIC_AUTHORIZATION_FAILED
    if spec.key == 10 and request is not None:
        # FindCoordinator: key type 1 looks up a transaction coordinator.
        if request.get("key_type") == 1:
            return TRANSACTIONAL_ID_AUTHORIZATION_FAILED
    if spec.key == 22 and request is not None and request.get("transactional_id") is None:
        return CLUSTER_AUTHORIZATION_FAILED  # idempotent producer id, not a transaction
    return spec.kind.value


__all__ = ["API_TABLE", "BUILDERS", "code_for", "error_response", "response_body"]
