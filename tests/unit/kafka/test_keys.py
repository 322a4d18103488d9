"""The numbers in parsers/kafka/keys.py are Kafka's, and policies/kafka_keys.py (which keeps its
own copy, as policies/ imports nothing from the project) agrees with them."""

from __future__ import annotations

import kafka.errors

from parsers.kafka import keys
from parsers.kafka.apis import API_TABLE
from policies import kafka_keys

API_KEY_NAMES = (
    "PRODUCE", "FETCH", "LIST_OFFSETS", "METADATA", "OFFSET_COMMIT", "OFFSET_FETCH",
    "FIND_COORDINATOR", "API_VERSIONS", "INIT_PRODUCER_ID", "DESCRIBE_CLUSTER",
    "CONSUMER_GROUP_HEARTBEAT", "DESCRIBE_TOPIC_PARTITIONS",
)  # fmt: skip
ERROR_NAMES = {
    "TOPIC_AUTHORIZATION_FAILED": "TopicAuthorizationFailedError",
    "GROUP_AUTHORIZATION_FAILED": "GroupAuthorizationFailedError",
    "CLUSTER_AUTHORIZATION_FAILED": "ClusterAuthorizationFailedError",
    "UNSUPPORTED_VERSION": "UnsupportedVersionError",
    "TRANSACTIONAL_ID_AUTHORIZATION_FAILED": "TransactionalIdAuthorizationFailedError",
    "FETCH_SESSION_ID_NOT_FOUND": "FetchSessionIdNotFoundError",
}
# Cilium's apiKey spelling where it is not Kafka's message name in lower case.
CILIUM_SPELLING = {"offsets": "listoffsets"}


def test_api_keys_are_the_message_specs_numbers():
    for name in API_KEY_NAMES:
        spec_name = "".join(part.capitalize() for part in name.split("_"))
        assert API_TABLE[getattr(keys, name)].spec_name == spec_name, name


def test_error_codes_are_kafkas():
    for name, error in ERROR_NAMES.items():
        assert kafka.errors.for_code(getattr(keys, name)).__name__ == error, name


def test_the_policy_copy_agrees_with_the_wire_numbers():
    checked = 0
    for name, number in kafka_keys.API_KEYS.items():
        spec = API_TABLE.get(number)
        if spec is None:
            continue  # inter-broker APIs (LeaderAndIsr, StopReplica...) the proxy never parses
        assert spec.spec_name.lower() == CILIUM_SPELLING.get(name, name), (name, number)
        checked += 1
    assert checked >= 15
    assert kafka_keys.API_KEYS["controlledshutdown"] == keys.CONTROLLED_SHUTDOWN
    assert kafka_keys.METADATA == keys.METADATA
    assert kafka_keys.ROLES["produce"] == (keys.PRODUCE, keys.METADATA, keys.API_VERSIONS)
