"""No Docker engine here: check the image and compose files statically."""

import os
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_only_paths_that_exist():
    steps = _instructions((DOCKER / "Dockerfile").read_text())
    copies = [rest.split() for word, rest in steps if word == "COPY"]
    assert copies, "the image copies the project in"
    for args in copies:
        for src in args[:-1]:
            if not src.startswith("--"):
                assert (REPO / src).exists(), f"COPY source {src} is missing from the repo"


def test_dockerfile_installs_through_the_shared_setup_script():
    steps = _instructions((DOCKER / "Dockerfile").read_text())
    runs = [rest for word, rest in steps if word == "RUN"]
    assert any(re.search(r"(^|\s)scripts/setup\.sh(\s|$)", r) for r in runs)
    assert (REPO / "scripts" / "setup.sh").exists()
    assert "scripts/setup.sh" in (REPO / "Makefile").read_text(), "make setup uses the same script"
    # setup.sh is what puts python3-bpfcc and the kernel headers in the image
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert "python3-bpfcc" in setup and "linux-headers-amd64" in setup
    assert steps[0][0] == "FROM" and steps[0][1].startswith("debian:")


def test_entrypoint_exists_is_executable_and_runs_the_cli():
    steps = _instructions((DOCKER / "Dockerfile").read_text())
    entry = [rest for word, rest in steps if word == "ENTRYPOINT"]
    assert entry == ['["/usr/local/bin/l7proxy-entrypoint"]']
    script = DOCKER / "entrypoint.sh"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert "scripts/setup.sh" in text and "bin/l7proxy" in text


def test_compose_puts_the_gateway_in_front_of_a_legacy_service():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    gateway, legacy = services["gateway"], services["legacy"]
    build = gateway["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    command = gateway["command"]
    assert command[0] == "gateway"
    assert "--upstream=legacy:80" in command
    for svc in (gateway, legacy):
        for volume in svc.get("volumes", []):
            host = volume.split(":")[0]
            if host.startswith("."):
                assert (DOCKER / host).exists(), f"compose mounts {host}, which is missing"
    policy = [c.split("=", 1)[1] for c in command if c.startswith("--policy=")]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in gateway["volumes"]}
    assert policy and policy[0] in mounts


def test_the_compose_gateway_policy_is_valid():
    from l7proxy.policy_files import load_paths

    result = load_paths([str(DOCKER / "gateway-policy.yaml")], strict=True)
    assert len(result.rules) == 1
