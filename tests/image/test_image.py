"""The product image, built with podman and run for real (`make test-image`; minutes, not in
`make test`).

scripts/build-image.sh makes the base with debootstrap, the wheelhouse on the host and the image
(`pip install --no-index` inside: no TLS during the build). Then the image runs
- `l7proxy gateway` in front of a real backend on the host: an allowed POST reaches it, a denied
  PUT is answered 403 by the gateway;
- `l7proxy agent` with the documented privileges (host network and pid, bpffs, cgroups, netns and
  state from the host) far enough that `status` says the datapath loaded and every part is ok;
and the image carries none of the test peers. The gateway-only image (`build-image.sh --gateway`,
docker/Dockerfile.gateway) runs the same gateway test and carries no bcc, LLVM, kernel headers or
network tools.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from l7proxy.agent.client import Client
from tests.agent_runner import free_pool

pytestmark = [pytest.mark.image, pytest.mark.root, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[2]
TAG = "localhost/l7proxy:test-image"
GATEWAY_TAG = "localhost/l7proxy-gateway:test-image"
GATEWAY_MAX_MIB = 300  # 225 MiB measured (121 of them the debootstrap base)
PODMAN = ["podman", "--runtime", "runc"]
RUN_FLAGS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network", "host"]
TEST_PEERS = ("nginx", "haproxy", "wrk", "iperf3", "kcat", "chromium", "podman", "h2load")


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    r = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {r.stderr}")
    return r


def build(*args: str) -> str:
    """scripts/build-image.sh ARGS; returns the tag, printing its size."""
    tag = args[-1]
    r = subprocess.run(
        [str(REPO / "scripts" / "build-image.sh"), *args],
        capture_output=True,
        text=True,
        timeout=1700,
        env={**os.environ, "L7PROXY_PYTHON": sys.executable},
    )
    assert r.returncode == 0, f"build-image.sh failed:\n{r.stdout}\n{r.stderr}"
    print(f"\nimage {tag}: {image_mib(tag):.0f} MiB")
    return tag


def image_mib(tag: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout) / 2**20


@pytest.fixture(scope="module")
def image():
    return build(TAG)


@pytest.fixture(scope="module")
def gateway_image():
    return build("--gateway", GATEWAY_TAG)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = f"backend saw {self.command} {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _answer

    def log_message(self, *args) -> None:
        pass


def request(method: str, url: str) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method != "GET" else None)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_image_carries_no_test_peers(image):
    script = "; ".join(f"command -v {p} || true" for p in TEST_PEERS)
    r = podman("run", "--rm", *RUN_FLAGS, "--entrypoint", "/bin/sh", image, "-c", script)
    assert r.stdout.strip() == "", f"test peers in the product image: {r.stdout.split()}"
    r = podman("run", "--rm", *RUN_FLAGS, image, "--help")
    assert "gateway" in r.stdout and "agent" in r.stdout


def test_gateway_from_the_image_in_front_of_a_real_backend(image, tmp_path):
    gateway_allows_and_denies(image, tmp_path)


def test_gateway_only_image_has_no_kernel_parts(gateway_image):
    checks = (
        "python3 -c 'import bcc' 2>/dev/null && echo bcc; "
        "ls /usr/lib/x86_64-linux-gnu/ | grep -i -E 'llvm|clang'; "
        "ls -d /usr/src/linux-headers-* /lib/modules/*/build 2>/dev/null; "
        "for t in ip tc iptables bpftool pip "
        + " ".join(TEST_PEERS)
        + "; do command -v $t; done; true"
    )
    r = podman("run", "--rm", *RUN_FLAGS, "--entrypoint", "/bin/sh", gateway_image, "-c", checks)
    assert r.stdout.strip() == "", f"the gateway-only image carries: {r.stdout.split()}"
    r = podman("run", "--rm", *RUN_FLAGS, gateway_image)
    assert r.stdout.startswith("usage: l7proxy gateway")
    assert image_mib(gateway_image) < GATEWAY_MAX_MIB


def test_gateway_from_the_gateway_only_image(gateway_image, tmp_path):
    gateway_allows_and_denies(gateway_image, tmp_path)


def gateway_allows_and_denies(image: str, tmp_path: Path) -> None:
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    gport = free_port()
    policy = tmp_path / "policy.yaml"  # the compose file's policy, for the port listened on here
    text = (REPO / "docker" / "gateway-policy.yaml").read_text()
    policy.write_text(text.replace('port: "8080"', f'port: "{gport}"'))
    name = f"l7gw-{uuid.uuid4().hex[:6]}"
    podman(
        "run", "-d", "--name", name, *RUN_FLAGS, "-v", f"{policy}:/etc/l7proxy/policy.yaml:ro",
        image, "gateway", f"--listen=127.0.0.1:{gport}",
        f"--upstream=127.0.0.1:{backend.server_address[1]}", "--policy=/etc/l7proxy/policy.yaml",
        "--labels=org=empire,class=deathstar", "--peer=127.0.0.0/8=org=empire,class=tiefighter",
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{gport}"
        deadline = time.monotonic() + 60
        while True:
            try:
                status, body = request("POST", base + "/v1/request-landing")
                break
            except OSError:
                assert time.monotonic() < deadline, podman("logs", name, check=False).stderr
                time.sleep(0.3)
        assert (status, body) == (200, "backend saw POST /v1/request-landing\n")
        status, body = request("PUT", base + "/v1/exhaust-port")
        assert status == 403 and "Access denied" in body
    finally:
        podman("rm", "-f", "-v", "-t", "0", name, check=False)  # -v: its anonymous volume
        backend.shutdown()


def test_agent_from_the_image_loads_the_datapath(image, tmp_path):
    prefix = f"l7i{uuid.uuid4().hex[:5]}"
    pin_dir = Path("/sys/fs/bpf/l7proxy") / prefix
    state, run = tmp_path / "state", tmp_path / "run"
    state.mkdir()
    run.mkdir()
    name = f"l7agent-{prefix}"
    podman(
        "run", "-d", "--name", name, *RUN_FLAGS, "--privileged", "--pid", "host",
        "-v", "/sys/fs/bpf:/sys/fs/bpf", "-v", "/sys/fs/cgroup:/sys/fs/cgroup",
        "-v", "/var/run/netns:/var/run/netns:shared", "-v", f"{state}:/var/lib/l7proxy",
        "-v", f"{run}:/var/run/l7proxy", image, "agent", "--pool", free_pool(),
        "--netns-prefix", f"{prefix}-", "--bpf-dir", str(pin_dir),
    )  # fmt: skip
    try:
        client = Client(str(run / "agent.sock"), timeout=10)
        deadline = time.monotonic() + 240  # bcc compiles the datapath inside the container
        status = None
        while time.monotonic() < deadline:
            try:
                status = client.call("status")
                break
            except Exception:
                alive = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
                assert alive.stdout.strip() == "true", podman("logs", name, check=False).stdout
                time.sleep(1)
        assert status is not None, podman("logs", name, check=False).stdout[-3000:]
        parts = status["parts"]
        assert parts["datapath"]["state"] == "ok", json.dumps(parts)
        assert "loaded at" in parts["datapath"]["detail"]
        assert all(p["state"] in ("ok", "off") for p in parts.values()), json.dumps(parts)
    finally:
        podman("rm", "-f", "-v", "-t", "10", name, check=False)
        shutil.rmtree(pin_dir, ignore_errors=True)
