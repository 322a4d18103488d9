"""Kafka API key names as Cilium spells them in `apiKey`, and the role expansions.

The numbers are Kafka's; their home for the proxy is parsers/kafka/keys.py. policies/ imports
nothing from the project, so this copy stays: tests/unit/kafka/test_keys.py checks they agree."""

from __future__ import annotations

API_KEYS = {
    "produce": 0,
    "fetch": 1,
    "offsets": 2,
    "metadata": 3,
    "leaderandisr": 4,
    "stopreplica": 5,
    "updatemetadata": 6,
    "controlledshutdown": 7,
    "offsetcommit": 8,
    "offsetfetch": 9,
    "findcoordinator": 10,
    "joingroup": 11,
    "heartbeat": 12,
    "leavegroup": 13,
    "syncgroup": 14,
    "describegroups": 15,
    "listgroups": 16,
    "saslhandshake": 17,
    "apiversions": 18,
    "createtopics": 19,
    "deletetopics": 20,
}
API_KEY_NAMES = {number: name for name, number in API_KEYS.items()}

ROLES = {
    "produce": (0, 3, 18),
    "consume": (1, 2, 3, 8, 9, 10, 11, 12, 13, 14, 18),
}

METADATA = 3


def api_key_number(text: str | int) -> int | None:
    """`"produce"`, `"Produce"`, `"0"` or `0` -> 0; None when unknown."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text if 0 <= text <= 32767 else None
    value = str(text).strip().lower()
    if value.isdigit():
        number = int(value)
        return number if number <= 32767 else None
    return API_KEYS.get(value)


def api_key_name(number: int) -> str:
    return API_KEY_NAMES.get(number, str(number))
