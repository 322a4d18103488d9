"""A small Prometheus registry: counters, gauges and histograms with labels, text exposition.

Hot paths keep a reference to a labelled child (`counter.labels(rule="received", proto="http")`)
and call `.inc()` on it, so a request costs an attribute add, not a dict lookup.
"""

from __future__ import annotations

from bisect import bisect_left

DEFAULT_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _label_text(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = value


class _HistogramValue:
    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labelnames: tuple[str, ...]) -> None:
        self.name = name
        self.help = help_text
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], object] = {}

    def _new_child(self):
        return _Value()

    def labels(self, **labels: str):
        key = tuple(str(labels[n]) for n in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def clear(self) -> None:
        """Forget every labelled child (a gauge or counter rebuilt at scrape time, whose label
        sets come and go, such as one per service)."""
        self._children.clear()

    def _default(self):
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}; use .labels(...)")
        return self.labels()

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, child in sorted(self._children.items()):
            lines.append(f"{self.name}{_label_text(self.labelnames, key)} {_num(child.value)}")
        return lines


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0) -> None:
        self._default().inc(amount)


class Gauge(_Metric):
    kind = "gauge"

    def inc(self, amount: float = 1.0) -> None:
        self._default().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._default().dec(amount)

    def set(self, value: float) -> None:
        self._default().set(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help_text, labelnames, buckets=DEFAULT_BUCKETS) -> None:
        super().__init__(name, help_text, labelnames)
        self.buckets = tuple(sorted(buckets))

    def _new_child(self):
        return _HistogramValue(self.buckets)

    def observe(self, value: float) -> None:
        self._default().observe(value)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, child in sorted(self._children.items()):
            running = 0
            for bound, count in zip((*self.buckets, float("inf")), child.counts, strict=True):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                labels = _label_text(self.labelnames, key, f'le="{le}"')
                lines.append(f"{self.name}_bucket{labels} {running}")
            base = _label_text(self.labelnames, key)
            lines.append(f"{self.name}_sum{base} {_num(child.sum)}")
            lines.append(f"{self.name}_count{base} {child.count}")
        return lines


class Registry:
    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _get(self, cls, name, help_text, labelnames, **kw):
        metric = self._metrics.get(name)
        if metric is None:
            metric = self._metrics[name] = cls(name, help_text, tuple(labelnames), **kw)
        elif not isinstance(metric, cls) or metric.labelnames != tuple(labelnames):
            raise ValueError(f"metric {name} is already registered with another type or labels")
        return metric

    def counter(self, name: str, help_text: str, labelnames=()) -> Counter:
        return self._get(Counter, name, help_text, labelnames)

    def gauge(self, name: str, help_text: str, labelnames=()) -> Gauge:
        return self._get(Gauge, name, help_text, labelnames)

    def histogram(self, name, help_text, labelnames=(), buckets=DEFAULT_BUCKETS) -> Histogram:
        return self._get(Histogram, name, help_text, labelnames, buckets=buckets)

    def render(self) -> str:
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"


# Gauges that describe the process rather than count things: merged by max, not summed.
_NOT_ADDITIVE = ("l7proxy_policy_revision",)


def merge_expositions(texts: list[str]) -> str:
    """Sum several workers' expositions sample by sample (counters, histograms and connection
    gauges add up; a revision is the max). Samples stay grouped under their family's
    HELP/TYPE lines, as the text format requires."""
    families: dict[str, list[str]] = {}  # family -> header lines then sample keys, in order
    values: dict[str, float] = {}
    histograms: set[str] = set()
    for text in texts:
        for line in text.splitlines():
            if line.startswith("# TYPE ") and line.endswith(" histogram"):
                histograms.add(line.split()[2])
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(maxsplit=3)
                entries = families.setdefault(parts[2] if len(parts) > 2 else line, [])
                if line not in entries:
                    entries.append(line)
                continue
            key, _, number = line.rpartition(" ")
            try:
                value = float(number)
            except ValueError:
                continue
            name = key.split("{", 1)[0]
            family = name
            for suffix in ("_bucket", "_sum", "_count"):
                if name.endswith(suffix) and name[: -len(suffix)] in histograms:
                    family = name[: -len(suffix)]
            entries = families.setdefault(family, [])
            if key not in values:
                values[key] = value
                entries.append(key)
            elif key.startswith(_NOT_ADDITIVE):
                values[key] = max(values[key], value)
            else:
                values[key] += value
    lines = [
        entry if entry.startswith("#") else f"{entry} {_num(values[entry])}"
        for entries in families.values()
        for entry in entries
    ]
    return "\n".join(lines) + "\n"


class ProxyMetrics:
    """The metrics every protocol session shares (names from the issue, Cilium-like)."""

    def __init__(self, registry: Registry | None = None) -> None:
        self.registry = registry or Registry()
        r = self.registry
        self.policy_l7 = r.counter(
            "policy_l7_total",
            "L7 requests by rule outcome: received, forwarded, denied, parse_errors",
            ("rule", "proto"),
        )
        self.request_duration = r.histogram(
            "l7proxy_request_duration_seconds",
            "Time from the end of the request head to the end of the response",
            ("proto",),
        )
        self.upstream_errors = r.counter(
            "l7proxy_upstream_errors_total",
            "Upstream failures by kind: refused, timeout, reset",
            ("proto", "kind"),
        )
        self.active_connections = r.gauge(
            "l7proxy_active_connections", "Client connections open now", ("proto",)
        )
        self.connections = r.counter(
            "l7proxy_connections_total", "Client connections accepted", ("proto",)
        )
        self.l4_drops = r.counter(
            "l7proxy_l4_denied_total", "Connections reset because L3/L4 policy denied them", ()
        )
        self.policy_revision = r.gauge(
            "l7proxy_policy_revision", "Revision of the policy in force", ()
        )
        self.policy_reload_errors = r.counter(
            "l7proxy_policy_reload_errors_total", "Rejected policy reloads", ()
        )

    def for_proto(self, proto: str) -> ProtoMetrics:
        return ProtoMetrics(self, proto)

    def render(self) -> str:
        return self.registry.render()


class ProtoMetrics:
    """Pre-bound children for one protocol: what a session touches per request."""

    __slots__ = (
        "received",
        "forwarded",
        "denied",
        "parse_errors",
        "duration",
        "active",
        "accepted",
        "upstream_refused",
        "upstream_timeout",
        "upstream_reset",
    )

    def __init__(self, metrics: ProxyMetrics, proto: str) -> None:
        l7 = metrics.policy_l7
        self.received = l7.labels(rule="received", proto=proto)
        self.forwarded = l7.labels(rule="forwarded", proto=proto)
        self.denied = l7.labels(rule="denied", proto=proto)
        self.parse_errors = l7.labels(rule="parse_errors", proto=proto)
        self.duration = metrics.request_duration.labels(proto=proto)
        self.active = metrics.active_connections.labels(proto=proto)
        self.accepted = metrics.connections.labels(proto=proto)
        errors = metrics.upstream_errors
        self.upstream_refused = errors.labels(proto=proto, kind="refused")
        self.upstream_timeout = errors.labels(proto=proto, kind="timeout")
        self.upstream_reset = errors.labels(proto=proto, kind="reset")
