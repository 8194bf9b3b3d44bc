"""The telemetry issue against real istiod: Istio's standard metrics on both VMs of a call, with exactly the labels
istio-proxy would put there (computed from the two workloads' metadata, tests/helpers/istio_metrics.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.helpers.istio_metrics import REFERENCE, Destination, Peer, expected_labels, find, series
from tests.interop.netlab.vm import TCP_PORT, Vm
from tests.interop.netlab.world import FORUM_HOST, NetLab

pytestmark = [pytest.mark.interop]
STATS_FLUSH_S = 5.5
"""Envoy's default stats flush interval (5 s), plus a margin."""
URL = f"http://{FORUM_HOST}/"
FORUM = Destination(host=FORUM_HOST, name="forum", namespace="forum")


def _peer(vm: Vm) -> Peer:
    """The workload as istio-proxy would describe it: istioctl's cluster.env, with the VM's own label additions."""
    env = vm.cluster_env()
    labels = json.loads(vm.env.get("ISTIO_METAJSON_LABELS") or env.get("ISTIO_METAJSON_LABELS") or "{}")
    ns = env["POD_NAMESPACE"]
    return Peer(
        workload=env.get("ISTIO_META_WORKLOAD_NAME", ""),
        namespace=ns,
        principal=f"spiffe://cluster.local/ns/{ns}/sa/{env['SERVICE_ACCOUNT']}",
        labels=labels,
        cluster=env.get("ISTIO_META_CLUSTER_ID", "Kubernetes"),
    )


def _metrics(vm: Vm) -> str:
    code, body = vm.local_get(15020, "/stats/prometheus")
    assert code == 200, code
    return body.decode()


def _value(text: str, name: str, labels: dict[str, str]) -> float:
    """The one sample of ``name`` whose labels are exactly ``labels`` (0 before the first request)."""
    exact = [v for lbl, v in find(text, name) if lbl == labels]
    assert len(exact) <= 1, exact
    return exact[0] if exact else 0.0


def test_istio_request_metrics_on_both_vms(lab: NetLab) -> None:
    webapp, v1, v2 = lab.vms["webapp"], lab.vms["forum-v1"], lab.vms["forum-v2"]
    src = _peer(webapp)
    dsts = {"v1": _peer(v1), "v2": _peer(v2)}
    wanted: dict[tuple[str, str], dict[str, str]] = {}
    for version, dst in dsts.items():
        wanted[("source", version)] = expected_labels("source", src, dst, FORUM)
        wanted[("destination", version)] = expected_labels("destination", src, dst, FORUM)
    reporters = {
        ("source", "v1"): webapp,
        ("source", "v2"): webapp,
        ("destination", "v1"): v1,
        ("destination", "v2"): v2,
    }
    names = (
        "istio_requests_total",
        "istio_request_duration_milliseconds_count",
        "istio_request_bytes_count",
        "istio_response_bytes_count",
    )

    def snapshot() -> dict[tuple[str, str, str], float]:
        pages = {vm.name: _metrics(vm) for vm in (webapp, v1, v2)}
        return {
            (r, ver, n): _value(pages[reporters[(r, ver)].name], n, wanted[(r, ver)])
            for (r, ver) in wanted
            for n in names
        }

    # The lab's VMs run the shipped Envoy, so HTTP requests are counted by the native stats filter.
    for vm in (webapp, v1, v2):
        status = vm.status()
        assert status is not None
        assert status["telemetry"]["native_stats"] is True, (vm.name, status["telemetry"])
    # Envoy folds histogram samples into /stats only at its stats flush (5 s): let earlier tests' samples land first.
    time.sleep(STATS_FLUSH_S)
    before = snapshot()
    n = 50
    results = webapp.app("get", url=URL, count=n)["results"]
    assert all(r["status"] == 200 for r in results), results[:3]
    served = {ver: sum(r["version"] == ver for r in results) for ver in ("v1", "v2")}

    # Counters move when a request ends; histograms at the next stats flush.
    def settled() -> dict[tuple[str, str, str], float] | None:
        now = snapshot()
        return now if all(now[k] - before[k] == served[k[1]] for k in now) else None

    try:
        after = lab.until_value(settled, 3 * STATS_FLUSH_S, "every request counted in every metric")
    except AssertionError:
        after = snapshot()  # the loop below names the metric that is off
    for (r, ver, name), value in after.items():
        assert value - before[(r, ver, name)] == served[ver], (r, ver, name, value, before[(r, ver, name)], served)
    lab.figures.record("telemetry_requests_counted", {f"{r}/{ver}": served[ver] for r, ver in wanted})
    # The VM is no longer "unknown" to its peers: the destination VM names webapp, the source names forum v1/v2.
    assert wanted[("destination", "v1")]["source_workload"] == "webapp"
    assert wanted[("source", "v1")]["destination_version"] == "v1"


def test_istio_tcp_metrics_for_the_tcp_port(lab: NetLab) -> None:
    webapp = lab.vms["webapp"]

    def sent() -> float:
        return sum(
            v
            for lbl, v in find(_metrics(webapp), "istio_tcp_sent_bytes_total", reporter="source")
            if lbl.get("destination_service") == FORUM_HOST
        )

    before = sent()
    out = webapp.app("tcp_echo", host=FORUM_HOST, port=TCP_PORT, size=256 << 10, timeout=60)
    assert out.get("identical"), out
    lab.until(lambda: sent() - before >= 256 << 10, 15, "the TCP connection's bytes in istio_tcp_sent_bytes_total")
    lab.figures.record("telemetry_tcp_sent_bytes_delta", sent() - before)


def test_metric_and_label_names_match_istios_published_list(lab: NetLab) -> None:
    published: dict[str, Any] = REFERENCE
    kinds = {**published["http_metrics"], **published["tcp_metrics"], **published["grpc_metrics"]}
    text = "\n".join(_metrics(vm) for vm in lab.vms.values())
    istio = {(name, tuple(sorted(lbl))) for name, lbl, _ in series(text) if name.startswith("istio_")}
    assert istio, "no istio_* series served"
    # istio_build is istio-proxy's build gauge, not one of the standard request/TCP metrics.
    build = {labels for name, labels in istio if name == "istio_build"}
    assert build == {("component", "tag")}, build
    istio = {(name, labels) for name, labels in istio if name != "istio_build"}
    http_only = set(published["http_only_labels"])
    for name, labels in istio:
        base = _base(name, kinds)
        assert base in kinds, name
        # Istio's list holds every label; the TCP metrics carry it without the HTTP-only ones.
        documented = set(published["labels"]) - (set() if base in published["http_metrics"] else http_only)
        extra = {"le"} if kinds[base] == "histogram" and name.endswith("_bucket") else set()
        assert set(labels) == documented | extra, (
            name,
            set(labels) ^ (documented | extra),
            _samples(text, name, labels),
        )


def _base(name: str, kinds: dict[str, str]) -> str:
    if name in kinds:
        return name
    for suffix in ("_bucket", "_count", "_sum"):
        if name.endswith(suffix) and name[: -len(suffix)] in kinds:
            return name[: -len(suffix)]
    return name


def _samples(text: str, name: str, labels: tuple[str, ...]) -> list[dict[str, str]]:
    return [lbl for n, lbl, _ in series(text) if n == name and tuple(sorted(lbl)) == labels][:3]
