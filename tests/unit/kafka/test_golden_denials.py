"""Golden bytes: every synthesised denial decodes with kafka-python's protocol classes.

Generated from the API table: for each API key, every version (flexible and not), a sample
request with one entry in every array is denied, and kafka-python must read back the same
correlation id and the authorization error in every error field of the mirrored entries.
"""

from __future__ import annotations

import pytest

from parsers.kafka.apis import API_TABLE
from parsers.kafka.denials import code_for, error_response
from tests.unit.kafka.samples import kafka_python_classes, sample

REQUESTS, RESPONSES = kafka_python_classes()
# Versions whose response has nowhere to carry an error: the proxy closes instead (asserted below).
NO_ERROR_FIELD = {(35, 0), (35, 1), (35, 2), (43, 0)}


def _cases():
    for key, spec in sorted(API_TABLE.items()):
        if key not in RESPONSES:
            continue
        lo, hi = spec.versions
        for version in range(lo, hi + 1):
            yield pytest.param(key, version, id=f"{spec.name}-v{version}")


def _error_codes(value, path=""):
    """Every (path, code) of an error field in a decoded message (as kafka-python's dict)."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _error_codes(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for name, item in value.items():
            if name in ("error_code", "partition_error_code"):
                yield f"{path}.{name}", item
            else:
                yield from _error_codes(item, f"{path}.{name}")


def test_table_covers_every_kafka_python_api():
    missing = set(RESPONSES) - set(API_TABLE)
    assert not missing


def test_both_flexible_and_classic_versions_are_covered():
    for key, spec in API_TABLE.items():
        if spec.flexible_min is not None and spec.flexible_min > 0 and key in RESPONSES:
            assert spec.versions[1] >= spec.flexible_min


@pytest.mark.parametrize(("key", "version"), list(_cases()))
def test_denial_decodes_with_kafka_python(key, version):
    spec = API_TABLE[key]
    request = sample(spec.request_fields, version)
    code = code_for(spec, topic_denied=key in (0, 1, 2, 3, 8, 19, 20, 21, 23, 28, 37, 61, 75))
    framed = error_response(spec, version, 4242, request, code)
    if (key, version) in NO_ERROR_FIELD:
        assert framed is None
        return
    assert framed is not None
    assert int.from_bytes(framed[:4], "big") == len(framed) - 4
    decoded = RESPONSES[key].decode(framed[4:], version=version, header=True)
    assert decoded._header.correlation_id == 4242
    codes = list(_error_codes(decoded.to_dict()))
    assert codes, f"no error field in {decoded}"
    assert {c for _, c in codes} <= {0, code}
    assert code in {c for _, c in codes}


@pytest.mark.parametrize("version", range(API_TABLE[1].versions[0], API_TABLE[1].versions[1] + 1))
def test_fetch_denial_carries_an_empty_record_set_not_a_null_one(version):
    """librdkafka treats a null record set (size -1) as a parse failure and retries without
    ever reporting the authorization error (tests/e2e: the consumer hung)."""
    spec = API_TABLE[1]
    framed = error_response(spec, version, 7, sample(spec.request_fields, version), 29)
    decoded = RESPONSES[1].decode(framed[4:], version=version, header=True).to_dict()
    partitions = [p for t in decoded["responses"] for p in t["partitions"]]
    assert partitions
    assert all(p["records"] is not None and len(p["records"]) == 0 for p in partitions)
