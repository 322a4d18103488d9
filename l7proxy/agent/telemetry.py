"""Agent metrics with Cilium's names, in the same registry the proxy workers count into.

Gauges that describe state (endpoints, identities, redirects, revision) are computed when
scraped, so they can never drift from the store. Counters of datapath verdicts come from the
flow stream (every L3/L4 event the BPF programs report passes through the flow log).
"""

from __future__ import annotations

from l7proxy.metrics import ProxyMetrics, Registry


class AgentMetrics:
    def __init__(self, agent) -> None:
        self.agent = agent
        self.registry = Registry()
        r = self.registry
        # Inline proxies share this registry: policy_l7_total and friends land here too. A proxy
        # worker process counts in its own and sends the text, appended at render time.
        own = agent.config.proxy_worker != "process" or agent.config.mode != "node"
        self.proxy = ProxyMetrics(r if own else Registry())
        self.drop_count = r.counter(
            "drop_count_total", "Packets dropped, by reason and direction", ("reason", "direction")
        )
        self.forward_count = r.counter(
            "forward_count_total", "Packets forwarded, by direction", ("direction",)
        )
        self.proxy_redirects = r.gauge(
            "proxy_redirects", "Policy entries redirecting to the proxy, by protocol", ("protocol",)
        )
        self.policy_change = r.counter(
            "policy_change_total", "Policy repository changes (imports and deletes)"
        )
        self.policy_revision = r.gauge("policy_max_revision", "Highest policy revision in force")
        self.policy_count = r.gauge("policy_count", "Policy documents in the repository")
        self.endpoint_count = r.gauge("endpoint_count", "Endpoints managed by this agent")
        self.identity_count = r.gauge(
            "identity_count", "Security identities (reserved and allocated)"
        )
        # services (issue 16); Cilium has no per-service flow counter, so these are our names
        svc = ("namespace", "service")
        self.service_flows = r.counter(
            "l7proxy_service_flows_total",
            "Translations to a backend, by service and kind (connect: TCP or connected UDP, "
            "socket LB; datagram: one unconnected UDP sendmsg; nodeport: a new NodePort flow "
            "through this node)",
            (*svc, "kind"),
        )
        self.service_no_backend = r.counter(
            "l7proxy_service_no_backend_total",
            "connect()/sendmsg() calls to a service VIP refused: no backend",
            svc,
        )
        self.service_backends = r.gauge(
            "l7proxy_service_backends",
            "Backends of a service, serving or terminating (in an endpoint's grace period)",
            (*svc, "state"),
        )
        self.service_sockets_reset = r.counter(
            "l7proxy_service_sockets_reset_total",
            "Sockets reset because the backend they were connected to left the service",
            svc,
        )

        self.timewait_reaped = r.counter(
            "l7proxy_proxy_timewait_reaped_total",
            "TIME_WAIT sockets the node proxy's transparent connections left in the host "
            "namespace, destroyed so the client can reuse its port at once",
        )
        self.timewait_reaped.inc(0)  # 0 is an answer: shown before the first one

    def count_flow(self, flow: dict) -> None:
        if flow.get("event_type") == "L7":
            return  # L7 outcomes are counted by the proxy in policy_l7_total
        if self.agent.datapath.name == "bpf":
            return  # packet counts come from the per-CPU counters at scrape time
        direction = flow.get("traffic_direction") or "UNKNOWN"
        verdict = flow.get("verdict")
        if verdict == "DROPPED":
            reason = flow.get("drop_reason_desc") or "POLICY_DENIED"
            self.drop_count.labels(reason=reason, direction=direction).inc()
        elif verdict in ("FORWARDED", "REDIRECTED"):
            self.forward_count.labels(direction=direction).inc()

    def _refresh_datapath(self) -> None:
        for (direction, verdict, reason), (
            packets,
            _bytes,
        ) in self.agent.datapath.counters().items():
            if verdict == "DROPPED":
                self.drop_count.labels(reason=reason or "UNKNOWN", direction=direction).set(packets)
            else:
                # REDIRECTED packets are forwarded too (to the proxy); Cilium counts them so.
                key = (direction,)
                totals = self._forward_totals
                totals[key] = totals.get(key, 0) + packets

    def _refresh(self) -> None:
        agent = self.agent
        if agent.datapath.name == "bpf":
            self._forward_totals: dict[tuple[str], int] = {}
            self._refresh_datapath()
            for (direction,), packets in self._forward_totals.items():
                self.forward_count.labels(direction=direction).set(packets)
        store = agent.store
        self.endpoint_count.set(len(store.endpoints()))
        self.identity_count.set(len(agent.identities()))
        self.policy_revision.set(store.revision())
        self.policy_count.set(len(store.policies()))
        self.policy_change.labels().set(int(store.get("policy_change_total", 0)))
        counts: dict[str, int] = {"http": 0, "kafka": 0}
        compiled = agent.compiled
        if compiled is not None:
            for ep in compiled.endpoints.values():
                for entry in _entries(ep.map_state):
                    if entry.l7_id and not entry.deny:
                        rules = compiled.l7.get(entry.l7_id)
                        proto = getattr(rules, "parser", "http") or "http"
                        counts[proto] = counts.get(proto, 0) + 1
        for proto, n in counts.items():
            self.proxy_redirects.labels(protocol=proto).set(n)

    def _refresh_services(self) -> None:
        agent = self.agent
        if agent.services is None:
            return
        for metric in (self.service_flows, self.service_no_backend, self.service_backends):
            metric.clear()  # deleted services leave the exposition
        stats = agent.lb.stats()
        for svc in agent.services.all():
            ids = {"namespace": svc.namespace, "service": svc.name}
            frontend = (svc.vip, svc.port, svc.protocol)
            connects, datagrams, no_backend, nodeport = stats.get(frontend, (0,) * 4)
            self.service_flows.labels(**ids, kind="connect").set(connects)
            if svc.protocol == "UDP":
                self.service_flows.labels(**ids, kind="datagram").set(datagrams)
            if svc.node_port:
                self.service_flows.labels(**ids, kind="nodeport").set(nodeport)
            self.service_no_backend.labels(**ids).set(no_backend)
            backends = agent.service_backends.get(svc.key, ())
            terminating = sum(1 for b in backends if b.terminating)
            self.service_backends.labels(**ids, state="serving").set(len(backends) - terminating)
            self.service_backends.labels(**ids, state="terminating").set(terminating)
        for key, n in agent.sockets_reset.items():
            namespace, _, name = key.partition("/")
            self.service_sockets_reset.labels(namespace=namespace, service=name).set(n)

    def render(self) -> str:
        self._refresh()
        self._refresh_services()
        worker = getattr(self.agent.proxy, "metrics_text", "")
        return worker + self.registry.render()


def _entries(map_state):
    values = getattr(map_state, "values", None)
    if values is not None:
        return list(values())
    return [map_state[k] for k in map_state]
