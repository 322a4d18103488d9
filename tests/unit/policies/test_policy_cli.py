"""`l7proxy policy validate` and `l7proxy policy trace`, as the acceptance checks call them."""

import json
from pathlib import Path

import pytest

from l7proxy.cli import main

CORPUS = Path(__file__).resolve().parents[2] / "policies"
from tests.shared import CILIUM_EXAMPLES as SHARED  # noqa: E402


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
    files = sorted(str(p) for p in (CORPUS / "valid").iterdir())
    assert len(files) >= 5 and any(f.endswith(".json") for f in files)
    code, out, _ = run(capsys, "policy", "validate", *files)
    assert code == 0, out


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not present (it is in CI)")
def test_every_cilium_example_validates(capsys):
    files = sorted(str(p) for p in SHARED.glob("*.yaml"))
    assert len(files) >= 50
    code, out, _ = run(capsys, "policy", "validate", *files)
    assert code == 0, out
    # unsupported fields are named, never dropped silently; toFQDNs and dns rules are enforced
    assert "toServices" in out and "toFQDNs" not in out and "rules.dns" not in out


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


def test_trace_world_destination_by_ip_uses_cidr_rules(capsys, tmp_path):
    pol = tmp_path / "egress.yaml"
    pol.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: e}\nspec:\n"
        "  endpointSelector: {matchLabels: {app: crawler}}\n  egress:\n"
        "  - toCIDRSet: [{cidr: 20.1.0.0/16, except: [20.1.9.0/24]}]\n"
        "    toPorts: [{ports: [{port: '443', protocol: TCP}]}]\n"
    )

    def t(ip, port="443"):
        code, out, err = run(
            capsys,
            "policy",
            "trace",
            "-p",
            str(pol),
            "--src",
            "app=crawler",
            "--dst",
            "reserved:world",
            "--dst-ip",
            ip,
            "--dport",
            port,
            "-o",
            "json",
        )
        assert code == 0, err
        return json.loads(out)

    ok = t("20.1.1.1")
    assert ok["verdict"] == "ALLOWED" and ok["egress"]["peer_identity"] >= 1 << 24
    assert ok["ingress"]["verdict"] == "ALLOWED"  # the world has no ingress policy
    assert t("20.1.9.9")["verdict"] == "DENIED"
    assert t("8.8.8.8")["egress"]["peer_identity"] == 2
    assert t("20.1.1.1", "80")["verdict"] == "DENIED"


def test_trace_host_destination_with_node_selector(capsys, tmp_path):
    pol = tmp_path / "host.yaml"
    pol.write_text(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: h}\nspec:\n"
        "  nodeSelector: {}\n  ingress:\n  - fromEntities: [cluster]\n"
        "    toPorts: [{ports: [{port: '22', protocol: TCP}]}]\n"
    )
    code, out, _ = run(
        capsys,
        "policy",
        "trace",
        "-p",
        str(pol),
        "--src",
        "app=ops",
        "--dst",
        "reserved:host",
        "--dport",
        "22",
        "-o",
        "json",
    )
    assert code == 0 and json.loads(out)["verdict"] == "ALLOWED"
    code, out, _ = run(
        capsys,
        "policy",
        "trace",
        "-p",
        str(pol),
        "--src",
        "reserved:world",
        "--src-ip",
        "1.2.3.4",
        "--dst",
        "reserved:host",
        "--dport",
        "22",
        "-o",
        "json",
    )
    assert code == 0 and json.loads(out)["verdict"] == "DENIED"


def test_trace_http_headers_and_header_actions(capsys):
    pol = str(CORPUS / "valid" / "http-headers.yaml")
    base = [
        "policy",
        "trace",
        "-p",
        pol,
        "--src",
        "app=frontend,k8s:io.kubernetes.pod.namespace=shop",
        "--dst",
        "app=api,k8s:io.kubernetes.pod.namespace=shop",
        "--dport",
        "8080",
        "-o",
        "json",
    ]
    code, out, _ = run(
        capsys,
        *base,
        "--http",
        "POST",
        "/v1/orders",
        "--header",
        "X-Auth-Token: 42",
        "--header",
        "X-Request-Id: 7",
        "--header",
        "X-Tenant: red",
    )
    r = json.loads(out)
    assert code == 0 and r["verdict"] == "ALLOWED"
    assert ["REPLACE", "X-Tenant", "blue"] in r["l7"]["rule_sets"][0]["header_actions"]
    code, out, _ = run(
        capsys,
        *base,
        "--http",
        "POST",
        "/v1/orders",
        "--header",
        "X-Auth-Token: 41",
        "--header",
        "X-Request-Id: 7",
    )
    assert json.loads(out)["verdict"] == "DENIED"
    code, out, _ = run(capsys, *base, "--http", "GET", "/v1/items/12", "--host", "api.shop.example")
    assert json.loads(out)["verdict"] == "ALLOWED"
    code, out, _ = run(
        capsys, *base[:-2], "--http", "GET", "/v1/items/12", "--host", "evil.example"
    )
    assert "host 'evil.example' does not match" in out and "verdict: DENIED" in out


def test_trace_policy_file_with_errors_exits_2(capsys):
    bad = sorted((CORPUS / "invalid").glob("*.yaml"))[0]
    code, _, err = run(
        capsys,
        "policy",
        "trace",
        "-p",
        str(bad),
        "--src",
        "app=a",
        "--dst",
        "app=b",
        "--dport",
        "80",
    )
    assert code == 2 and f"{bad}:" in err


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is not present (it is in CI)")
def test_trace_reserved_ingress_endpoint_with_cidr_source(capsys):
    pol = str(SHARED / "examples__kubernetes__servicemesh__policy__allow-ingress-cidr.yaml")

    def t(ip):
        code, out, _ = run(
            capsys,
            "policy",
            "trace",
            "-p",
            pol,
            "--src",
            "reserved:world",
            "--src-ip",
            ip,
            "--dst",
            "reserved:ingress",
            "--dport",
            "80",
            "-o",
            "json",
        )
        assert code == 0
        return json.loads(out)

    assert t("172.18.0.1")["verdict"] == "ALLOWED"
    assert t("172.18.0.2")["verdict"] == "DENIED"


def test_validate_json_output(capsys):
    warn = str(CORPUS / "valid" / "unsupported-warnings.yaml")
    code, out, _ = run(capsys, "policy", "validate", "-o", "json", warn)
    doc = json.loads(out)
    assert code == 0 and doc["valid"] is True and doc["rules"] == 1
    fields = {d["field"].rsplit(".", 1)[-1] for d in doc["diagnostics"]}
    assert {"toServices", "authentication", "terminatingTLS"} <= fields
    assert all(d["severity"] == "warning" for d in doc["diagnostics"])


TAGGED = (
    "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: !foo x\n"
    "spec:\n  endpointSelector: {}\n"
)
TAG_DIAG = "4: metadata.name: unsupported YAML tag '!foo' (only str, int, float, bool, null)"


def test_a_yaml_tag_is_a_diagnostic_in_validate_import_and_the_agent(capsys, tmp_path):
    """Issue 19: `name: !foo x` ended `policy validate` in a ConstructorError traceback."""
    path = tmp_path / "tag.yaml"
    path.write_text(TAGGED)
    code, out, err = run(capsys, "policy", "validate", str(path))
    assert (code, out, "Traceback" in err) == (1, f"{path}:{TAG_DIAG}\n", False)
    # `policy import` checks before it talks to the agent (no agent listens on this socket)
    code, out, err = run(
        capsys, "policy", "import", str(path), "--socket", str(tmp_path / "none.sock")
    )
    assert code == 1 and f"{path}:{TAG_DIAG}" in err and "nothing changed" in err
    # the agent checks again whatever reaches it over its API
    from l7proxy.agent.api import ApiError
    from l7proxy.agent.policy_repo import split_documents

    for text, expect in (
        (TAGGED, "p.yaml:4: metadata.name: not valid YAML or JSON: unsupported YAML tag '!foo'"),
        ("[" * 100_000 + "]" * 100_000, "p.yaml:1: [0][0]"),  # libyaml's composer crashed here
        ("a: [\n", "p.yaml:2: document: not valid YAML or JSON: "),
    ):
        with pytest.raises(ApiError) as info:
            split_documents("p.yaml", text, 1)
        assert str(info.value).startswith(expect), info.value


def test_a_gateway_reload_of_a_tagged_file_keeps_the_policy_in_force(tmp_path):
    from l7proxy.gateway_policy import GatewayPolicy

    path = tmp_path / "p.yaml"
    path.write_text(TAGGED.replace("!foo ", ""))
    policy = GatewayPolicy([str(path)], "app=web")
    first = policy.load()
    path.write_text(TAGGED)
    ok, message = policy.reload()
    assert not ok and message == f"{path}:{TAG_DIAG}"
    assert policy.current is first and policy.last_error == message


def test_policy_import_refuses_an_oversized_file_before_reading_it_whole(capsys, tmp_path):
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as f:
        f.truncate(64 * 1024 * 1024)  # sparse: reading it whole would allocate 64 MiB
    code, _, err = run(
        capsys, "policy", "import", str(huge), "--socket", str(tmp_path / "none.sock")
    )
    assert code == 1
    assert err == f"{huge}:0: file: file too large (more than 4194304 bytes)\n"
