"""The Kafka API keys and error codes the code names: their one home.

The numbers are Kafka's wire protocol (the message specs in kafka-python, which also generate
schemas.py). parsers/ and l7proxy/ import them from here. policies/kafka_keys.py keeps its own
copy of the names Cilium's `apiKey` accepts, as policies/ imports nothing from the project;
tests/unit/kafka/test_keys.py checks that the two agree.
"""

from __future__ import annotations

# API keys
PRODUCE = 0
FETCH = 1
LIST_OFFSETS = 2
METADATA = 3
CONTROLLED_SHUTDOWN = 7
OFFSET_COMMIT = 8
OFFSET_FETCH = 9
FIND_COORDINATOR = 10
API_VERSIONS = 18
INIT_PRODUCER_ID = 22
DESCRIBE_CLUSTER = 60
CONSUMER_GROUP_HEARTBEAT = 68
DESCRIBE_TOPIC_PARTITIONS = 75

# Error codes
TOPIC_AUTHORIZATION_FAILED = 29
GROUP_AUTHORIZATION_FAILED = 30
CLUSTER_AUTHORIZATION_FAILED = 31
UNSUPPORTED_VERSION = 35
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
FETCH_SESSION_ID_NOT_FOUND = 70

# FindCoordinator key types
COORDINATOR_TRANSACTION = 1
# Config resource types
RESOURCE_TOPIC = 2
RESOURCE_GROUP = 32
