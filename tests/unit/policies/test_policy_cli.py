"""`l7proxy policy validate` and `l7proxy policy trace`, as the acceptance checks call them."""

import json
from pathlib import Path

import pytest

from l7proxy.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "policies"
SHARED = Path(__file__).resolve().parents[4] / "shared" / "conformance" / "cilium-examples"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_validate_ok_and_error_exit_codes(capsys, tmp_path):
    good = CORPUS / "valid" / "http-headers.yaml"
    code, out, _ = run(capsys, "policy", "validate", str(good))
    assert code == 0, out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: b\nspec:\n"
        "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports:\n      - port: '99999'\n"
    )
    code, out, _ = run(capsys, "policy", "validate", str(good), str(bad))
    assert code == 1
    assert (
        f"{bad}:10: spec.ingress[0].toPorts[0].ports[0].port: port 99999 is out of range 0-65535"
        in out
    )


@pytest.mark.parametrize("path", sorted((CORPUS / "invalid").glob("*.yaml")), ids=lambda p: p.name)
def test_invalid_corpus_reports_expected_line_and_field(capsys, path):
    expect = [
        line[len("# expect: ") :]
        for line in path.read_text().splitlines()
        if line.startswith("# expect: ")
    ]
    assert expect, "each invalid file names the diagnostics it expects"
    code, out, _ = run(capsys, "policy", "validate", str(path))
    assert code == 1
    for e in expect:
        assert f"{path}:{e}" in out, out


def test_valid_corpus_validates(capsys):
    files = sorted(str(p) for p in (CORPUS / "valid").glob("*.yaml"))
    assert len(files) >= 5
    code, out, _ = run(capsys, "policy", "validate", *files)
    assert code == 0, out


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not present (it is in CI)")
def test_every_cilium_example_validates(capsys):
    files = sorted(str(p) for p in SHARED.glob("*.yaml"))
    assert len(files) >= 50
    code, out, _ = run(capsys, "policy", "validate", *files)
    assert code == 0, out
    # unsupported fields are named, never dropped silently
    assert "toFQDNs" in out and "toServices" in out and "dns" in out


SW = str(CORPUS / "valid" / "star-wars.yaml")


def trace(capsys, *extra):
    code, out, err = run(capsys, "policy", "trace", "-p", SW, *extra, "-o", "json")
    assert code == 0, err
    return json.loads(out)


def test_trace_l7_allowed_and_denied(capsys):
    base = (
        "--src",
        "org=empire,class=tiefighter",
        "--dst",
        "org=empire,class=deathstar",
        "--dport",
        "80",
    )
    ok = trace(capsys, *base, "--http", "POST", "/v1/request-landing")
    assert ok["verdict"] == "ALLOWED" and ok["l7"]["verdict"] == "ALLOWED"
    assert ok["l7"]["matched"][0]["rule"] == "{method=POST path=/v1/request-landing}"
    no = trace(capsys, *base, "--http", "PUT", "/v1/exhaust-port")
    assert no["verdict"] == "DENIED" and no["l7"]["verdict"] == "DENIED"
    assert no["ingress"]["verdict"] == "ALLOWED"


def test_trace_without_l7_request_reports_redirect(capsys):
    r = trace(
        capsys,
        "--src",
        "org=empire,class=tiefighter",
        "--dst",
        "org=empire,class=deathstar",
        "--dport",
        "80/TCP",
    )
    assert r["verdict"] == "ALLOWED"
    assert r["l7"]["redirect"] is True and r["l7"]["rules"] == [
        "{method=POST path=/v1/request-landing}"
    ]
    assert set(r) == {"verdict", "egress", "ingress", "l7", "log"}


def test_trace_l3_denied_and_world_source(capsys):
    r = trace(
        capsys,
        "--src",
        "org=alliance,class=xwing",
        "--dst",
        "org=empire,class=deathstar",
        "--dport",
        "80",
    )
    assert r["verdict"] == "DENIED" and r["ingress"]["verdict"] == "DENIED" and r["l7"] is None
    w = trace(
        capsys,
        "--src",
        "reserved:world",
        "--src-ip",
        "192.0.2.1",
        "--dst",
        "org=empire,class=deathstar",
        "--dport",
        "80",
    )
    assert w["verdict"] == "DENIED" and w["egress"]["verdict"] == "ALLOWED"


def test_trace_text_explains_rules(capsys):
    code, out, _ = run(
        capsys,
        "policy",
        "trace",
        "-p",
        SW,
        "--src",
        "org=alliance",
        "--dst",
        "org=empire,class=deathstar",
        "--dport",
        "80",
    )
    assert code == 0
    assert (
        "rule default/rule1" in out and "peer is not selected" in out and "verdict: DENIED" in out
    )


def test_trace_kafka(capsys):
    kafka = str(CORPUS / "valid" / "kafka.yaml")

    def k(*extra):
        code, out, err = run(
            capsys,
            "policy",
            "trace",
            "-p",
            kafka,
            "--src",
            "app=empire-hq",
            "--dst",
            "app=kafka",
            "--dport",
            "9092",
            *extra,
            "-o",
            "json",
        )
        assert code == 0, err
        return json.loads(out)

    assert (
        k("--kafka-api-key", "produce", "--kafka-topic", "deathstar-plans")["verdict"] == "ALLOWED"
    )
    denied = k(
        "--kafka-api-key", "0", "--kafka-topic", "deathstar-plans", "--kafka-topic", "secret"
    )
    assert denied["verdict"] == "DENIED"
    assert denied["l7"]["rule_sets"][0]["denied_topics"] == ["secret"]
    assert k("--kafka-api-key", "fetch", "--kafka-topic", "deathstar-plans")["verdict"] == "DENIED"


@pytest.mark.parametrize(
    "argv",
    [
        ("--src", "=x", "--dst", "app=a", "--dport", "80"),
        ("--src", "app=a", "--dst", "app=b", "--dport", "80/XYZ"),
        ("--src", "app=a", "--dst", "app=b", "--dport", "99999"),
        ("--src", "app=a", "--dst", "app=b", "--dport", "80", "--kafka-api-key", "nope"),
        ("--src", "reserved:bogus", "--dst", "app=b", "--dport", "80"),
    ],
)
def test_trace_bad_input_exits_2(capsys, argv):
    code, _, err = run(capsys, "policy", "trace", "-p", SW, *argv)
    assert code == 2 and "policy trace:" in err
