"""Gateway mode: protect one endpoint (`--labels`) in front of fixed upstreams.

The policy port is the listener's port; the source identity comes from the client address through
the `--peer` table (longest prefix, else world). One worker runs: the policy, the flow sink, the
metrics, the admin server (worker 0 only), one `Listener` per configured port, the deadline
sweeper, the SIGHUP/file-change reload and the SIGTERM drain.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import os
import shutil
import signal
import tempfile

from l7proxy.admin import AdminServer, install_core_routes
from l7proxy.config import GatewayConfig, HostPort, ListenerConfig
from l7proxy.flows import FlowSink
from l7proxy.gateway_policy import GatewayPolicy
from l7proxy.kafka.settings import gateway_broker_map
from l7proxy.log import log
from l7proxy.metrics import ProxyMetrics
from l7proxy.protocols import worker_upstreams
from l7proxy.server import (
    DeadlineSweeper,
    Gate,
    Listener,
    bind,
    install_uvloop,
    run_forked,
    static_destination,
)
from l7proxy.session import drain_sessions


class RuleRef:
    """`ctx.rules()` for one connection: the rule set of the policy in force, looked up again
    only when a reload brought a new snapshot (so a reload applies to the next request)."""

    __slots__ = ("policy", "ip", "port", "snapshot", "rules")

    def __init__(self, policy: GatewayPolicy, ip: str, port: int) -> None:
        self.policy, self.ip, self.port = policy, ip, port
        self.snapshot = None
        self.rules = None

    def __call__(self):
        snap = self.policy.current
        if snap is not self.snapshot:
            self.rules = snap.rules_for(self.ip, self.port)
            self.snapshot = snap
        return self.rules


class GatewayWorker:
    def __init__(self, cfg: GatewayConfig, policy: GatewayPolicy) -> None:
        self.cfg = cfg
        self.policy = policy
        self.flows = FlowSink(cfg.flow_log)
        self.metrics = ProxyMetrics()
        self.sweeper = DeadlineSweeper(cfg.proxy.sweep_interval)
        self.pool = worker_upstreams(cfg.proxy)
        self.admin: AdminServer | None = None
        self.private: AdminServer | None = None
        self.map_service = None
        self.servers: list[asyncio.AbstractServer] = []
        self.stopping: asyncio.Event | None = None

    def _listener(self, lc, port: int) -> Listener:
        policy = self.policy

        def classify(ip: str):
            return policy.current.l4(ip, port)

        def rules_for(ip: str):
            return RuleRef(policy, ip, port)

        def endpoint():
            snap = policy.current
            return snap.endpoint_identity, snap.endpoint_labels

        return Listener(
            port=port,
            protocol=lc.protocol,
            destination=static_destination(lc.upstream.host, lc.upstream.port),
            classify=classify,
            rules_for=rules_for,
            endpoint=endpoint,
            config=self.cfg.proxy,
            flows=self.flows,
            metrics=self.metrics,
            sweeper=self.sweeper,
            upstreams=self.pool,
        )

    async def run(
        self, sockets, admin_sock, on_listening, metrics_path=None, peer_metrics=()
    ) -> int:
        """Serve until SIGTERM. With several workers, worker 0 has the admin port and sums the
        others' /metrics, which each serves on its private unix socket `metrics_path`."""
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self.metrics.policy_revision.set(self.policy.current.revision)
        for lc, sock in zip(self.cfg.listeners, sockets, strict=True):
            port = sock.getsockname()[1]
            lst = self._listener(lc, port)
            server = await loop.create_server(lambda lst=lst: Gate(lst), sock=sock, backlog=4096)
            self.servers.append(server)
        if admin_sock is not None:
            self.admin = AdminServer(self.cfg.proxy.admin)
            install_core_routes(self.admin, self.metrics, self._policy_info, peer_metrics)
            self._mount_map(multi=bool(peer_metrics))
            await self.admin.start(None, None, sock=admin_sock)
        if metrics_path is not None:
            self.private = AdminServer(self.cfg.proxy.admin)
            install_core_routes(self.private, self.metrics, self._policy_info)
            await self.private.start_unix(metrics_path)
        self.sweeper.start()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        watcher = loop.create_task(self._watch())
        # Everything built so far (modules, the compiled policy) lives as long as the worker:
        # out of the collector's sight, a full collection has less to walk (shorter pauses).
        gc.freeze()
        on_listening()
        await self.stopping.wait()
        watcher.cancel()
        await self.drain()
        return 0

    def _mount_map(self, multi: bool) -> None:
        """The live dependency map (l7proxy/depmap) on the admin port: fed by this worker's
        flows, or by the shared flow log when several workers write it."""
        try:
            from l7proxy.depmap.web import mount
        except ImportError:
            return
        if multi and self.cfg.flow_log and self.cfg.flow_log != "-":
            self.map_service = mount(self.admin, follow_log=self.cfg.flow_log)
        else:
            self.map_service = mount(self.admin, self.flows)

    def _policy_info(self) -> dict:
        info = self.policy.current.info()
        info["last_error"] = self.policy.last_error
        info["pid"] = os.getpid()
        return info

    def reload(self) -> None:
        ok, msg = self.policy.reload()
        if ok:
            self.metrics.policy_revision.set(self.policy.current.revision)
            log(f"policy reloaded: {msg}")
        else:
            self.metrics.policy_reload_errors.inc()
            log(f"policy reload rejected, keeping revision {self.policy.current.revision}: {msg}")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.policy_watch_interval)
            if self.policy.changed_on_disk():
                self.reload()

    async def drain(self) -> None:
        """Stop accepting, let requests in flight finish (up to drain_time), then close."""
        for server in self.servers:
            server.close()
        log(f"draining: stopped accepting, {len(self.sweeper.sessions)} connection(s) open")
        await drain_sessions(self.sweeper.sessions, self.cfg.proxy.drain_time)
        self.sweeper.stop()
        if self.map_service is not None:
            await self.map_service.close()
        for admin in (self.admin, self.private):
            if admin is not None:
                await admin.close()
        self.pool.close()
        self.flows.close()
        log("drained, exiting")


def with_kafka_broker_map(cfg: GatewayConfig, sockets) -> GatewayConfig:
    """Kafka responses naming a broker a listener fronts (Metadata, FindCoordinator,
    DescribeCluster) advertise that listener instead, so a client that bootstrapped through the
    gateway never connects around it. Built from the bound ports (a listener may ask for port 0)
    and put in the config (proxy.kafka.brokers) before any worker forks (docs/kafka.md)."""
    bound = [
        ListenerConfig(HostPort(lc.listen.host, sock.getsockname()[1]), lc.upstream, lc.protocol)
        for lc, sock in zip(cfg.listeners, sockets, strict=True)
    ]
    brokers = tuple(gateway_broker_map(bound, cfg.advertise_host).items())
    kafka = dataclasses.replace(cfg.proxy.kafka, brokers=brokers)
    return dataclasses.replace(cfg, proxy=cfg.proxy.replace(kafka=kafka))


def run_gateway(cfg: GatewayConfig) -> int:
    cfg.validate()
    policy = GatewayPolicy(cfg.policy_paths, cfg.labels, cfg.peers)
    try:
        policy.load()
    except Exception as exc:
        diags = getattr(exc, "diagnostics", None)
        for d in diags or [exc]:
            log(f"invalid policy: {d}")
        return 2
    multi = cfg.workers > 1
    try:
        sockets = [
            bind(lc.listen.host, lc.listen.port, listen=not multi, reuseport=multi)
            for lc in cfg.listeners
        ]
        admin_sock = None
        if cfg.admin:
            admin_sock = bind(cfg.admin.host, cfg.admin.port, listen=not multi, reuseport=multi)
    except OSError as exc:
        log(f"cannot listen: {exc}")
        return 2
    cfg = with_kafka_broker_map(cfg, sockets)

    def announce() -> None:
        for lc, sock in zip(cfg.listeners, sockets, strict=True):
            host, port = sock.getsockname()[:2]
            log(f"listening {lc.protocol} {host}:{port} -> {lc.upstream}")
        if admin_sock is not None:
            host, port = admin_sock.getsockname()[:2]
            log(f"admin {host}:{port}")
        log(f"ready: {cfg.workers} worker(s), policy revision {policy.current.revision}")

    if not multi:
        install_uvloop()
        return asyncio.run(GatewayWorker(cfg, policy).run(sockets, admin_sock, announce))

    sockdir = tempfile.mkdtemp(prefix="l7proxy-workers-")
    metric_paths = [os.path.join(sockdir, f"worker-{i}.sock") for i in range(cfg.workers)]

    def child(index: int, ready_fd: int) -> int:
        own = [bind(*s.getsockname()[:2], listen=True) for s in sockets]
        own_admin = None
        if admin_sock is not None and index == 0:
            own_admin = bind(*admin_sock.getsockname()[:2], listen=True)
        for s in sockets:
            s.close()
        if admin_sock is not None:
            admin_sock.close()
        install_uvloop()

        def ready() -> None:
            os.write(ready_fd, b"r")
            os.close(ready_fd)

        worker = GatewayWorker(cfg, policy)
        if index == 0:
            return asyncio.run(worker.run(own, own_admin, ready, None, metric_paths[1:]))
        return asyncio.run(worker.run(own, None, ready, metric_paths[index]))

    try:
        return run_forked(cfg.workers, child, announce)
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)
