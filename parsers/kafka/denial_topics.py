"""Denial answers that mirror a request's topics and partitions (Produce, Fetch, ListOffsets,
Metadata, OffsetCommit/OffsetFetch, topic administration, transactional markers...): every
topic and partition of the request comes back with the error code. See denials.py."""

from __future__ import annotations

from collections.abc import Callable

Builder = Callable[[int, dict, int], dict]
# Topic authorized operations / cluster authorized operations when not asked for (INT32_MIN).
NO_OPERATIONS = -2147483648


def partition_indexes(items, key="partitions", index="partition_index") -> list[int]:
    """Partition indexes of a request topic: a list of ints or of partition structs."""
    found = items.get(key) or []
    return [p if isinstance(p, int) else p[index] for p in found]


def produce(v, req, code):
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


def fetch(v, req, code):
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


def list_offsets(v, req, code):
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
                    for i in partition_indexes(t)
                ],
            }
            for t in req["topics"]
        ]
    }


def metadata(v, req, code):
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
                "topic_authorized_operations": NO_OPERATIONS,
            }  # fmt: skip
            for t in req.get("topics") or []
        ],
        "cluster_authorized_operations": NO_OPERATIONS,
        "error_code": 0,
    }


def topic_partitions(topic_key: str, resp_key: str, parts_key: str, index_key: str,
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
                        for i in partition_indexes(t, req_parts, req_index)
                    ],
                }
                for t in req.get("topics") or []
            ]
        }

    return build


def offset_fetch(v, req, code):
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


def create_topics(v, req, code):
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


def delete_topics(v, req, code):
    if v <= 5:
        return {"responses": [{"name": n, "error_code": code} for n in req["topic_names"]]}
    return {
        "responses": [
            {"name": t.get("name"), "topic_id": t.get("topic_id"), "error_code": code}
            for t in req["topics"]
        ]
    }


def add_partitions_to_txn(v, req, code):
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


def create_partitions(v, req, code):
    return {"results": [{"name": t["name"], "error_code": code} for t in req["topics"]]}


def partition_errors(indexes, code: int) -> list[dict]:
    """The usual answer per partition: its index and the error code."""
    return [{"partition_index": i, "error_code": code} for i in indexes]


def named_topics(topics, code: int, index_key: str = "partition_indexes") -> list[dict]:
    """Topics by name, each with its partitions' errors (`index_key`: where the request keeps
    the partition indexes: a list of ints, or partition structs with `partition_index`)."""
    return [
        {"name": t["name"], "partitions": partition_errors(partition_indexes(t, index_key), code)}
        for t in topics
    ]


def describe_producers(v, req, code):
    return {"topics": named_topics(req["topics"], code)}


def describe_topic_partitions(v, req, code):
    return {
        "topics": [
            {
                "error_code": code,
                "name": t["name"],
                "partitions": [],
                "topic_authorized_operations": NO_OPERATIONS,
            }  # fmt: skip
            for t in req["topics"]
        ],
        "next_cursor": None,
    }


def offset_delete(v, req, code):
    return {"error_code": 0, "topics": named_topics(req["topics"], code, "partitions")}


def write_txn_markers(v, req, code):
    return {
        "markers": [
            {
                "producer_id": m["producer_id"],
                "topics": named_topics(m["topics"], code),
            }  # fmt: skip
            for m in req["markers"]
        ]
    }


def alter_replica_log_dirs(v, req, code):
    return {
        "results": [
            {
                "topic_name": t["name"],
                "partitions": partition_errors(t["partitions"], code),
            }  # fmt: skip
            for d in req["dirs"]
            for t in d["topics"]
        ]
    }
