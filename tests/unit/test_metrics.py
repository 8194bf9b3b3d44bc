"""vm_agent.metrics: the text exposition Prometheus scrapes, checked line by line and with Prometheus' own parser
(prometheus_client's, where installed: an independent reading of the format)."""

from __future__ import annotations

import math
import os
import threading

import pytest

from vm_agent.metrics import (
    CollectorRegistry,
    Counter,
    CounterMetricFamily,
    Gauge,
    GaugeMetricFamily,
    Histogram,
    MetricFamily,
    ProcessCollector,
    generate_latest,
    go_float,
)


def test_counter_gauge_histogram_exposition() -> None:
    reg = CollectorRegistry()
    hits = Counter("t_hits_total", "Hits by kind", ["kind"], registry=reg)
    up = Gauge("t_up", 'Up "now"\\n', registry=reg)
    lat = Histogram("t_seconds", "Latency", buckets=(0.1, 1), registry=reg)
    hits.labels("a").inc()
    hits.labels(kind='b"\\\n').inc(2)
    up.set(1)
    up.dec(0.5)
    for value in (0.05, 0.5, 5):
        lat.observe(value)
    text = generate_latest(reg).decode()
    assert text == (
        "# HELP t_hits_total Hits by kind\n"
        "# TYPE t_hits_total counter\n"
        't_hits_total{kind="a"} 1.0\n'
        't_hits_total{kind="b\\"\\\\\\n"} 2.0\n'
        '# HELP t_up Up "now"\\\\n\n'
        "# TYPE t_up gauge\n"
        "t_up 0.5\n"
        "# HELP t_seconds Latency\n"
        "# TYPE t_seconds histogram\n"
        't_seconds_bucket{le="0.1"} 1.0\n'
        't_seconds_bucket{le="1.0"} 2.0\n'
        't_seconds_bucket{le="+Inf"} 3.0\n'
        "t_seconds_count 3.0\n"
        "t_seconds_sum 5.55\n"
    )
    assert reg.get_sample_value("t_hits_total", {"kind": "a"}) == 1.0
    assert reg.get_sample_value("t_seconds_bucket", {"le": "1.0"}) == 2.0
    assert reg.get_sample_value("t_hits_total", {"kind": "zzz"}) is None


def test_prometheus_parser_reads_it_back() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    reg = CollectorRegistry()
    Counter("p_events", "Events", ["side", "code"], registry=reg).labels("up", "OK").inc(3)
    family = CounterMetricFamily("p_custom", "From a collector", labels=["result"])
    family.add_metric(["hit"], 7)
    gauge = GaugeMetricFamily("p_names", "Names")
    gauge.add_metric([], 42)

    class Custom:
        def collect(self) -> list[MetricFamily]:
            return [family, gauge]

    reg.register(Custom())
    parsed = {m.name: m for m in parser.text_string_to_metric_families(generate_latest(reg).decode())}
    assert parsed["p_events"].type == "counter"
    assert [(s.name, s.labels, s.value) for s in parsed["p_events"].samples] == [
        ("p_events_total", {"side": "up", "code": "OK"}, 3.0)
    ]
    assert [(s.labels, s.value) for s in parsed["p_custom"].samples] == [({"result": "hit"}, 7.0)]
    assert parsed["p_names"].samples[0].value == 42.0


def test_names_are_registered_once_and_labels_must_match() -> None:
    reg = CollectorRegistry()
    c = Counter("dup", "x", ["a"], registry=reg)
    with pytest.raises(ValueError, match="already registered"):
        Gauge("dup", "y", registry=reg)
    with pytest.raises(ValueError, match="expected labels"):
        c.labels("one", "two")
    with pytest.raises(ValueError, match="only go up"):
        c.labels("one").inc(-1)
    assert c.labels(a="x") is c.labels("x")


def test_go_float_matches_the_go_clients() -> None:
    assert [go_float(v) for v in (1, 0.5, 1234567.0, 1e7, math.inf, -math.inf)] == [
        "1.0",
        "0.5",
        "1.234567e+06",
        "1e+07",
        "+Inf",
        "-Inf",
    ]
    assert go_float(math.nan) == "NaN"


def test_counters_are_exact_under_threads() -> None:
    reg = CollectorRegistry()
    c = Counter("threads", "x", registry=reg)

    def bump() -> None:
        for _ in range(10000):
            c.inc()

    workers = [threading.Thread(target=bump) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert reg.get_sample_value("threads_total") == 40000


def test_process_collector_reports_this_process() -> None:
    reg = CollectorRegistry()
    ProcessCollector("x", registry=reg)
    with open("/proc/self/status") as f:
        rss_kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    rss = reg.get_sample_value("x_process_resident_memory_bytes")
    assert rss is not None and abs(rss - rss_kib * 1024) < 16 * 2**20
    assert reg.get_sample_value("x_process_open_fds") == pytest.approx(len(os.listdir("/proc/self/fd")), abs=2)
    assert (reg.get_sample_value("x_process_cpu_seconds_total") or 0) > 0
    assert (reg.get_sample_value("x_process_max_fds") or 0) > 0
