"""Every limit and timeout of the proxy, in one place, with unit constants.

`ProxyConfig` is what a protocol session reads (frozen, shared by all connections of a worker).
`GatewayConfig` / `ListenerConfig` describe what the gateway runs; they come from the command line
or from a YAML file (`-c CONFIG.yaml`), and the two can be mixed (flags win).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from parsers.http_path import ESCAPED_SLASH_MODES, UNESCAPE

KiB = 1024
MiB = 1024 * KiB
SECOND = 1.0
MILLISECOND = SECOND / 1000
MINUTE = 60 * SECOND

DEFAULT_DENY_MESSAGE = "Access denied\r\n"


@dataclass(frozen=True, slots=True)
class KafkaConfig:
    """Kafka's own limits (`ProxyConfig.kafka`; in a config file `limits: {kafka: {...}}`). Why
    these values: docs/kafka.md, "Data path and performance decisions"."""

    # Write buffer marks of both transports of a Kafka connection, in place of the HTTP-sized
    # `write_high_water` / `write_low_water`: Kafka frames run to megabytes, and with a 256 KiB
    # mark every produce request of a pipelining producer paused its client.
    write_high_water: int = 4 * MiB
    write_low_water: int = 1 * MiB
    # SO_RCVBUF of the client socket and SO_SNDBUF of the broker socket; 0 leaves them to the
    # kernel, which grows loopback buffers to megabytes that park requests the broker then reads
    # late (512 KiB measured best for produce). It caps a connection at ~1 MiB per round trip:
    # set 0 on a long-RTT path.
    socket_buffer: int = 512 * KiB
    # Gateway mode: (broker address as responses name it, listener to advertise instead) pairs,
    # so a client that bootstrapped through the gateway never connects around it. The gateway
    # fills them in from its Kafka listeners (l7proxy/kafka/settings.py gateway_broker_map);
    # empty in the transparent modes, which pass broker addresses through.
    brokers: tuple[tuple[tuple[str, int], tuple[str, int]], ...] = ()
    # Array elements one request may hold in all, nested ones included (decode_bounded in
    # parsers/kafka/codec.py): each costs a dict, a policy check and a flow record, and real
    # clients send thousands at most. A 2 MB Metadata of 1 M topics cost a worker 27 s before.
    max_request_elements: int = 100_000

    def __post_init__(self) -> None:
        # Pairs of pairs whatever they came as (a config file gives lists).
        pairs = tuple((tuple(b), tuple(a)) for b, a in self.brokers)
        object.__setattr__(self, "brokers", pairs)
        if self.max_request_elements < 1:
            raise ValueError("kafka max_request_elements must be at least 1")
        if not 0 < self.write_low_water <= self.write_high_water:
            raise ValueError("kafka write_low_water must be within 1..write_high_water")
        if self.socket_buffer < 0:
            raise ValueError("kafka socket_buffer must be 0 (kernel sizing) or more")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """The admin port's limits (`ProxyConfig.admin`; in a config file `limits: {admin: {...}}`;
    its address is the top-level `admin: HOST:PORT`)."""

    # A request head (request line + headers) larger than this, or not complete within
    # `read_timeout`, ends the admin connection without an answer.
    max_head_bytes: int = 16 * KiB
    read_timeout: float = 10 * SECOND

    def __post_init__(self) -> None:
        if self.max_head_bytes < 1 * KiB or self.read_timeout <= 0:
            raise ValueError("admin max_head_bytes must be at least 1024, read_timeout positive")


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    # HTTP/1 request head: the whole head (request line + headers), the header count, the URI.
    max_header_bytes: int = 64 * KiB
    max_header_count: int = 100
    max_uri_bytes: int = 8 * KiB
    # HTTP/1 response head from the upstream (status line + headers): above it the client gets
    # 502 and the upstream connection is closed.
    max_response_header_bytes: int = 64 * KiB
    # Kafka and other length-prefixed protocols: a frame larger than this closes the connection.
    max_frame_bytes: int = 8 * MiB
    # Kafka's own buffer sizes (the frame limit is max_frame_bytes above).
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    # Time to receive a complete request head once its first byte arrived (408 after).
    header_timeout: float = 10 * SECOND
    # A client connection with no request in flight is closed after this long.
    idle_timeout: float = 5 * MINUTE
    upstream_connect_timeout: float = 5 * SECOND
    # Time to the first byte of the upstream's response (504 after); 0 disables it.
    upstream_response_timeout: float = 60 * SECOND
    max_connections: int = 10_000
    # SIGTERM: requests in flight get this long to finish before connections are closed.
    drain_time: float = 10 * SECOND
    # Backpressure: a transport buffering more than `write_high_water` bytes pauses the peer's
    # reading until it drains to `write_low_water`.
    write_high_water: int = 256 * KiB
    write_low_water: int = 64 * KiB
    # Idle upstream keep-alive connections kept per destination.
    upstream_pool_size: int = 256
    # HTTP/1 pipelining: requests queued behind the one in flight before the client is no longer
    # read (reading resumes when half of them are answered).
    http1_max_pipeline: int = 32
    # HTTP/1 Content-Length bodies (request and response) with at least this many bytes still
    # to come after the read that held the head move socket -> pipe -> socket with splice(2),
    # not through Python (l7proxy/http1/bodies.py); 0 keeps every body on the Python path.
    http1_splice_min_body: int = 64 * KiB
    # An HTTP/1 client connection with no request in flight keeps its upstream connection this
    # long for its next request, then gives it back to the pool: idle clients don't each pin an
    # upstream socket (10,000 idle keep-alive clients hold 10,000 fds, not 20,000).
    upstream_park_after: float = 1 * SECOND
    deny_message: str = DEFAULT_DENY_MESSAGE
    # HTTP/2 (l7proxy/http2 maps these onto the relay's H2Limits; the request header-list
    # limits come from max_header_bytes / max_header_count above, the hard one at 4x).
    # Streams a client may have open: advertised as MAX_CONCURRENT_STREAMS (the smaller of this
    # and the server's value); excess streams get REFUSED_STREAM.
    h2_max_concurrent_streams: int = 256
    # Largest frame accepted or relayed (SETTINGS_MAX_FRAME_SIZE is capped to it both ways).
    # 16 KiB is the RFC 9113 default, so clients are told no larger size unless this is raised
    # (h2spec 4.2 #3 assumes a server that did not raise it).
    h2_max_frame_size: int = 16 * KiB
    # CONTINUATION frames per header block (the block's bytes are bounded by max_header_bytes).
    h2_max_continuation_frames: int = 32
    # HPACK dynamic table the client may use for requests / the server for responses (0 makes
    # every response block memoizable: docs/http2.md).
    h2_max_header_table_size: int = 64 * KiB
    h2_response_header_table_size: int = 0
    # Flood budgets (token buckets, refilled every second): client resets of streams in flight
    # (rapid reset) and refused streams; PING/SETTINGS/PRIORITY/empty DATA/unknown frames.
    h2_reset_burst: int = 400
    h2_reset_refill: int = 200  # per second
    h2_control_burst: int = 1000
    h2_control_refill: int = 1000  # per second
    # Body of a denied stream read and dropped before the stream is reset.
    h2_max_discarded_body: int = 64 * MiB
    # Server DATA held while the client's window is owed the proxy's own 403 bodies.
    h2_max_held_bytes: int = 1 * MiB
    # A closed HTTP/2 connection whose client does not read what is left (GOAWAY included) is
    # aborted after this long.
    h2_close_grace: float = 5 * SECOND
    # `--protocol auto`: bytes read before the protocol must be known (HTTP/2's preface is 24),
    # and the largest Kafka frame length the sniffer takes as Kafka (looser than
    # max_frame_bytes on purpose: the Kafka session answers an oversized frame itself).
    sniff_max_bytes: int = 64
    sniff_max_kafka_frame: int = 64 * MiB
    # How often the worker's deadline sweeper looks at every session's deadline: the resolution
    # of all the timeouts above.
    sweep_interval: float = 250 * MILLISECOND
    admin: AdminConfig = field(default_factory=AdminConfig)
    # HTTP request paths with %2F, %5C or a backslash (parsers/http_path.py, docs/proxy-core.md):
    # "unescape" judges and forwards them as `/` (how nginx reads them), "reject" answers 400,
    # "keep" (Envoy's KEEP_UNCHANGED) leaves them: unsafe before a backend that decodes them.
    path_escaped_slashes: str = UNESCAPE
    # DNS proxy (docs/dns.md): how long an allowed query waits for the server; how many queries
    # one proxy has in flight (more are dropped, counted); the largest DNS-over-TCP message.
    dns_upstream_timeout: float = 2 * SECOND
    dns_max_inflight: int = 4096
    dns_max_tcp_message: int = 65535
    # toFQDNs: an answer's TTL is raised to at least dns_min_ttl (Cilium's tofqdns-min-ttl);
    # one endpoint keeps at most dns_max_ips_per_name IPs per name (tofqdns-endpoint-max-ip-per-
    # hostname, oldest first out); expired IPs are looked at every dns_gc_interval.
    dns_min_ttl: float = 0
    dns_max_ips_per_name: int = 1000
    dns_gc_interval: float = 1 * SECOND
    # The CPU nice value the DNS proxy gives the thread its event loop runs on (0: unchanged).
    # On a busy node the proxy's p99 is time spent waiting for a CPU (docs/dns.md, Numbers).
    dns_nice: int = -10

    def __post_init__(self) -> None:
        if self.max_response_header_bytes < 1 * KiB:
            raise ValueError("max_response_header_bytes must be at least 1024")
        if not 16 * KiB <= self.h2_max_frame_size <= (1 << 24) - 1:
            raise ValueError("h2_max_frame_size must be within 16384..16777215 (RFC 9113)")
        for name in (
            "h2_max_concurrent_streams", "h2_max_continuation_frames", "h2_reset_burst",
            "h2_reset_refill", "h2_control_burst", "h2_control_refill", "http1_max_pipeline",
            "sniff_max_bytes", "dns_max_inflight", "dns_max_ips_per_name",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("h2_max_header_table_size", "h2_response_header_table_size"):
            if not 0 <= getattr(self, name) < 1 << 32:
                raise ValueError(f"{name} must be within 0..2^32-1")
        if self.http1_splice_min_body < 0:
            raise ValueError("http1_splice_min_body must be 0 (off) or a byte count")
        if not -20 <= self.dns_nice <= 19:
            raise ValueError("dns_nice must be within -20..19")
        if self.sweep_interval <= 0:
            raise ValueError("sweep_interval must be positive")
        if self.path_escaped_slashes not in ESCAPED_SLASH_MODES:
            raise ValueError(
                f"path_escaped_slashes must be one of {', '.join(ESCAPED_SLASH_MODES)}"
            )

    def replace(self, **changes) -> ProxyConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> HostPort:
        host, sep, port = str(text).rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        host = host.strip("[]") or "0.0.0.0"
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    listen: HostPort
    upstream: HostPort
    protocol: str = "http"  # http | http2 | kafka | auto


@dataclass(frozen=True, slots=True)
class PeerConfig:
    cidr: str
    labels: str  # "k=v,k=v" as given; parsed by the policy adapter

    @classmethod
    def parse(cls, text: str) -> PeerConfig:
        cidr, sep, labels = text.partition("=")
        if not sep or not labels:
            raise ValueError(f"expected CIDR=k=v[,k=v...], got {text!r}")
        return cls(cidr.strip(), labels.strip())


PROTOCOLS = ("http", "http2", "kafka", "auto")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listeners: tuple[ListenerConfig, ...]
    policy_paths: tuple[str, ...]
    labels: str
    peers: tuple[PeerConfig, ...] = ()
    admin: HostPort | None = None
    flow_log: str | None = None
    workers: int = 1
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    # The host a Kafka listener bound to a wildcard address (0.0.0.0, ::) advertises in the
    # broker addresses it rewrites (None: 127.0.0.1).
    advertise_host: str | None = None
    # How often the policy files' modification times are looked at (a change reloads them, as
    # SIGHUP does).
    policy_watch_interval: float = 1 * SECOND

    def validate(self) -> None:
        if not self.listeners:
            raise ValueError("no listener: give --listen and --upstream or listeners: in -c")
        if not self.policy_paths:
            raise ValueError("no policy: give --policy FILE")
        if not self.labels:
            raise ValueError("no endpoint labels: give --labels k=v")
        for lst in self.listeners:
            if lst.protocol not in PROTOCOLS:
                raise ValueError(f"protocol {lst.protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")


_PROXY_FIELDS = {f.name for f in dataclasses.fields(ProxyConfig)}
# The typed sub-configs of ProxyConfig: a mapping under `limits:` in a config file.
_SUB_CONFIGS = {"kafka": KafkaConfig, "admin": AdminConfig}


def load_yaml(path: str | Path) -> dict:
    """Read a gateway config file into plain keyword arguments for `build_gateway_config`.

    Shape (every key optional; flags given on the command line win):
      listeners: [{listen: HOST:PORT, upstream: HOST:PORT, protocol: http}]
      policy: [FILE, ...]        labels: k=v,k=v        peers: ["CIDR=k=v", ...]
      admin: HOST:PORT           flow_log: FILE|-        workers: N       deny_message: TEXT
      advertise_host: HOST       (what a 0.0.0.0 Kafka listener advertises; default 127.0.0.1)
      limits: {max_header_bytes: 65536, header_timeout: 10, ...}   (ProxyConfig fields)
              kafka: {write_high_water: 4194304, socket_buffer: 524288}  (KafkaConfig fields)
              admin: {max_head_bytes: 16384, read_timeout: 10}  (AdminConfig fields)
    """
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    unknown = set(data) - {
        "listeners",
        "policy",
        "labels",
        "peers",
        "admin",
        "flow_log",
        "workers",
        "deny_message",
        "limits",
        "advertise_host",
    }
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    limits = data.get("limits") or {}
    bad = set(limits) - _PROXY_FIELDS
    if bad:
        raise ValueError(f"{path}: unknown limits {sorted(bad)}")
    for name, sub in _SUB_CONFIGS.items():
        if isinstance(limits.get(name), dict):
            bad = set(limits[name]) - {f.name for f in dataclasses.fields(sub)}
            if bad:
                raise ValueError(f"{path}: unknown {name} limits {sorted(bad)}")
            limits = {**limits, name: sub(**limits[name])}
    policy = data.get("policy") or []
    return {
        "listeners": [
            ListenerConfig(
                HostPort.parse(item["listen"]),
                HostPort.parse(item["upstream"]),
                item.get("protocol", "http"),
            )
            for item in data.get("listeners") or []
        ],
        "policy_paths": [policy] if isinstance(policy, str) else list(policy),
        "labels": data.get("labels") or "",
        "peers": [PeerConfig.parse(p) for p in data.get("peers") or []],
        "admin": HostPort.parse(data["admin"]) if data.get("admin") else None,
        "flow_log": data.get("flow_log"),
        "workers": int(data.get("workers", 1)),
        "deny_message": data.get("deny_message"),
        "limits": limits,
        "advertise_host": data.get("advertise_host"),
    }
