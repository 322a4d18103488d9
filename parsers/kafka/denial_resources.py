"""Denial answers for requests about groups, coordinators, transactional ids, config resources,
ACLs and quotas: every group, key or resource of the request comes back with the error code.
See denials.py."""

from __future__ import annotations

from collections.abc import Callable

from parsers.kafka.denial_topics import NO_OPERATIONS, Builder
from parsers.kafka.keys import (
    CLUSTER_AUTHORIZATION_FAILED,
    GROUP_AUTHORIZATION_FAILED,
    RESOURCE_GROUP,
    RESOURCE_TOPIC,
    TOPIC_AUTHORIZATION_FAILED,
)


def find_coordinator(v, req, code):
    if v <= 3:
        return {"error_code": code, "error_message": None, "node_id": -1, "host": "", "port": -1}
    return {
        "coordinators": [
            {"key": k, "node_id": -1, "host": "", "port": -1, "error_code": code}
            for k in req["coordinator_keys"]
        ]
    }


def resource_code(code: int) -> Callable[[int], int]:
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


def resources(resp_key: str) -> Builder:
    def build(v, req, code):
        pick = resource_code(code)
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


def describe_groups(v, req, code):
    return {
        "groups": [
            {
                "error_code": code,
                "group_id": g,
                "group_state": "",
                "protocol_type": "",
                "protocol_data": "",
                "members": [],
                "authorized_operations": NO_OPERATIONS,
            }  # fmt: skip
            for g in req["groups"]
        ]
    }


def delete_groups(v, req, code):
    return {"results": [{"group_id": g, "error_code": code} for g in req["groups_names"]]}


def leave_group(v, req, code):
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


def per_item(resp_key: str, req_key: str, item: Callable[[dict, int], dict]) -> Builder:
    def build(v, req, code):
        return {resp_key: [item(x, code) for x in req.get(req_key) or []]}

    return build


def txn_states(v, req, code):
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
