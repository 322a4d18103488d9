"""Schemas for APIs that the kafka-python spec copy lacks, written from Kafka's message specs.

Same field format as schemas.py: (name, kind, versions, nullable_versions, tag, tagged_versions,
default, children).
"""

OPEN = 0x7FFF
_TOPIC_PARTITIONS = (
    ("topic_id", "uuid", (0, OPEN), None, None, None, None, None),
    ("partitions", "[]int32", (0, OPEN), None, None, None, None, None),
)

# fmt: off
EXTRA_MESSAGES = {
    # ConsumerGroupHeartbeat (KIP-848): the new consumer group protocol, flexible from v0.
    68: {
        "name": "ConsumerGroupHeartbeat",
        "valid": (0, 1),
        "flexible": (0, OPEN),
        "request": (
            ("group_id", "string", (0, OPEN), None, None, None, None, None),
            ("member_id", "string", (0, OPEN), None, None, None, None, None),
            ("member_epoch", "int32", (0, OPEN), None, None, None, None, None),
            ("instance_id", "string", (0, OPEN), (0, OPEN), None, None, "null", None),
            ("rack_id", "string", (0, OPEN), (0, OPEN), None, None, "null", None),
            ("rebalance_timeout_ms", "int32", (0, OPEN), None, None, None, -1, None),
            ("subscribed_topic_names", "[]string", (0, OPEN), (0, OPEN), None, None, "null", None),
            ("subscribed_topic_regex", "string", (1, OPEN), (1, OPEN), None, None, "null", None),
            ("server_assignor", "string", (0, OPEN), (0, OPEN), None, None, "null", None),
            ("topic_partitions", "[]", (0, OPEN), (0, OPEN), None, None, "null", _TOPIC_PARTITIONS),
        ),
        "response": (
            ("throttle_time_ms", "int32", (0, OPEN), None, None, None, None, None),
            ("error_code", "int16", (0, OPEN), None, None, None, None, None),
            ("error_message", "string", (0, OPEN), (0, OPEN), None, None, "null", None),
            ("member_id", "string", (0, OPEN), (0, OPEN), None, None, "null", None),
            ("member_epoch", "int32", (0, OPEN), None, None, None, None, None),
            ("heartbeat_interval_ms", "int32", (0, OPEN), None, None, None, None, None),
            ("assignment", "{}", (0, OPEN), (0, OPEN), None, None, "null", (
                ("topic_partitions", "[]", (0, OPEN), None, None, None, None, _TOPIC_PARTITIONS),
            )),
        ),
    },
}
# fmt: on
