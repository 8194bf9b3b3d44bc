"""The agent's own Prometheus metrics: counters, gauges, histograms and the text exposition format 0.0.4.

Every package defines its metrics at module level against ``REGISTRY`` (names start with ``vm_agent_``);
the status server merges this registry with Envoy's stats on /stats/prometheus. The API is the subset of
prometheus_client the agent uses (``Counter(name, doc, labelnames, registry=REGISTRY)``, ``.labels()``,
``.inc()``, ``.set()``, ``.observe()``, ``REGISTRY.get_sample_value()``, ``generate_latest()``); the library
itself costs the agent ~5 MiB and ~25 ms of imports (an HTTP server, urllib, email, ...), so it is not used.
Like the Go client pilot-agent uses, no ``_created`` series are exported.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, Self

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class MetricFamily:
    """One metric as a collector reports it: a name, its help text, its type and its samples."""

    name: str
    documentation: str
    type: str
    samples: list[Sample] = field(default_factory=list)


class Collector(Protocol):
    def collect(self) -> Iterable[MetricFamily]: ...


class CounterMetricFamily(MetricFamily):
    """A counter a custom collector computes at scrape time (``add_metric`` per label set)."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name.removesuffix("_total"), documentation, "counter")
        self._labels = tuple(labels)

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name + "_total", dict(zip(self._labels, values, strict=True)), value))


class GaugeMetricFamily(MetricFamily):
    """A gauge a custom collector computes at scrape time."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, documentation, "gauge")
        self._labels = tuple(labels)

    def add_metric(self, values: Sequence[str], value: float) -> None:
        self.samples.append(Sample(self.name, dict(zip(self._labels, values, strict=True)), value))


class CollectorRegistry:
    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def register(self, collector: Collector, *, names: Iterable[str] = ()) -> None:
        """Add ``collector``; ``names`` (its metric names, when known up front) must not be taken yet."""
        wanted = set(names)
        with self._lock:
            taken = wanted & self._names
            if taken:
                raise ValueError(f"metric {', '.join(sorted(taken))} is already registered")
            self._names |= wanted
            self._collectors.append(collector)

    def collect(self) -> Iterator[MetricFamily]:
        with self._lock:
            collectors = list(self._collectors)
        for collector in collectors:
            yield from collector.collect()

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The current value of one sample (tests and debugging), or ``None`` if there is none."""
        wanted = labels or {}
        for family in self.collect():
            for sample in family.samples:
                if sample.name == name and sample.labels == wanted:
                    return sample.value
        return None


REGISTRY = CollectorRegistry()


class _Value:
    __slots__ = ("_lock", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self._lock = threading.Lock()

    def add(self, amount: float) -> None:
        with self._lock:
            self.value += amount

    def set(self, value: float) -> None:
        with self._lock:
            self.value = float(value)


class _Metric:
    _type = ""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Self] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self, names=[name])

    def labels(self, *values: object, **by_name: object) -> Self:
        """The child for one combination of label values (created on first use)."""
        if by_name:
            if values:
                raise ValueError("labels(): pass label values by position or by name, not both")
            values = tuple(by_name[n] for n in self._labelnames)
        if len(values) != len(self._labelnames):
            raise ValueError(f"{self._name}: expected labels {self._labelnames}, got {values}")
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._child()
        return child

    def _child(self) -> Self:
        return type(self)(self._name, self._documentation, registry=None)

    def _own_samples(self, labels: dict[str, str]) -> list[Sample]:
        raise NotImplementedError

    def collect(self) -> list[MetricFamily]:
        family = MetricFamily(self._name, self._documentation, self._type)
        if not self._labelnames:
            family.samples = self._own_samples({})
        else:
            with self._lock:
                children = list(self._children.items())
            for key, child in children:
                family.samples.extend(child._own_samples(dict(zip(self._labelnames, key, strict=True))))
        return [family]


class Counter(_Metric):
    _type = "counter"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._value = _Value()
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry=registry)

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._value.add(amount)

    def _own_samples(self, labels: dict[str, str]) -> list[Sample]:
        return [Sample(self._name + "_total", labels, self._value.value)]


class Gauge(_Metric):
    _type = "gauge"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        self._value = _Value()
        super().__init__(name, documentation, labelnames, registry=registry)

    def inc(self, amount: float = 1.0) -> None:
        self._value.add(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._value.add(-amount)

    def set(self, value: float) -> None:
        self._value.set(value)

    def _own_samples(self, labels: dict[str, str]) -> list[Sample]:
        return [Sample(self._name, labels, self._value.value)]


DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)


class Histogram(_Metric):
    _type = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        registry: CollectorRegistry | None = REGISTRY,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = tuple(bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0
        self._hist_lock = threading.Lock()
        super().__init__(name, documentation, labelnames, registry=registry)

    def _child(self) -> Self:
        return type(self)(self._name, self._documentation, buckets=self._bounds, registry=None)

    def observe(self, value: float) -> None:
        with self._hist_lock:
            self._sum += value
            for i, bound in enumerate(self._bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break

    def _own_samples(self, labels: dict[str, str]) -> list[Sample]:
        with self._hist_lock:
            counts, total = list(self._counts), self._sum
        out = []
        cumulative = 0
        for bound, count in zip(self._bounds, counts, strict=True):
            cumulative += count
            out.append(Sample(self._name + "_bucket", {**labels, "le": go_float(bound)}, cumulative))
        out.append(Sample(self._name + "_count", labels, cumulative))
        out.append(Sample(self._name + "_sum", labels, total))
        return out


class ProcessCollector:
    """CPU time, memory, open files and start time of this process, from /proc (Linux only)."""

    def __init__(self, namespace: str, registry: CollectorRegistry = REGISTRY) -> None:
        self._prefix = f"{namespace}_process_" if namespace else "process_"
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/stat") as f:
            self._boot = next((float(line.split()[1]) for line in f if line.startswith("btime ")), 0.0)
        registry.register(self)

    def collect(self) -> list[MetricFamily]:
        try:
            with open("/proc/self/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return []
        p = self._prefix

        def gauge(name: str, doc: str, value: float) -> MetricFamily:
            return MetricFamily(p + name, doc, "gauge", [Sample(p + name, {}, value)])

        # Fields after the command name, 0-based from "state": utime 11, stime 12, starttime 19, vsize 20, rss 21.
        out = [
            gauge("virtual_memory_bytes", "Virtual memory size in bytes.", float(fields[20])),
            gauge("resident_memory_bytes", "Resident memory size in bytes.", float(fields[21]) * self._page),
            gauge(
                "start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                float(fields[19]) / self._ticks + self._boot,
            ),
            MetricFamily(
                p + "cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                "counter",
                [Sample(p + "cpu_seconds_total", {}, (float(fields[11]) + float(fields[12])) / self._ticks)],
            ),
        ]
        with contextlib.suppress(OSError):
            out.append(gauge("open_fds", "Number of open file descriptors.", float(len(os.listdir("/proc/self/fd")))))
        try:
            with open("/proc/self/limits") as f:
                for line in f:
                    if line.startswith("Max open files"):
                        out.append(gauge("max_fds", "Maximum number of open file descriptors.", float(line.split()[3])))
        except (OSError, ValueError, IndexError):
            pass
        return out


def go_float(value: float) -> str:
    """A sample value as Prometheus' Go clients write it (``+Inf``, ``NaN``, ``1.5e+07`` for large numbers)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(float(value))
    dot = text.find(".")
    if value > 0 and dot > 6 and "e" not in text:
        digits = (text[:dot] + text[dot + 1 :]).rstrip("0")
        mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _sample_line(sample: Sample) -> str:
    labels = ""
    if sample.labels:
        labels = "{" + ",".join(f'{k}="{_escape_label(v)}"' for k, v in sample.labels.items()) + "}"
    return f"{sample.name}{labels} {go_float(sample.value)}\n"


def generate_latest(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry in Prometheus' text format 0.0.4."""
    out: list[str] = []
    for family in registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        doc = family.documentation.replace("\\", "\\\\").replace("\n", "\\n")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {family.type}\n")
        out.extend(_sample_line(s) for s in family.samples)
    return "".join(out).encode()


ProcessCollector(namespace="vm_agent")
