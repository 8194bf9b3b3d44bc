"""The native stats filter (vm_agent/telemetry/native) inside the shipped Envoy, on its own: what it writes for
requests that succeed and fail, how it escapes what callers send, and that the agent reads it back into Istio's
metrics. The whole path (two `vm-agent run` VMs, labels computed independently) is
tests/integration/agent/test_agent_telemetry.py."""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.net import free_port
from tests.integration.mesh_xdsgen.support import running_envoy
from vm_agent.envoy_binary import find_envoy_binary
from vm_agent.telemetry.filters import SEPARATOR
from vm_agent.telemetry.metrics import _LINE, _UNESCAPE, IstioMetrics, LocalWorkload, Raw
from vm_agent.telemetry.native import EXPORT_FILE, NativeStats
from vm_agent.telemetry.native.build import build

pytestmark = [pytest.mark.integration]

ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}
ANSWER = "Q0FGRQ=="  # what a peer's Envoy answers with (any value: the filter only carries it)


def _hcm(stat_prefix: str, filters: list[dict[str, Any]], *routes: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
            ".HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "http_filters": [*filters, ROUTER],
            "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": list(routes)}]},
        },
    }


def _listener(name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [hcm]}],
    }


@pytest.fixture
def envoy(tmp_path: Path) -> Iterator[tuple[NativeStats, int, int]]:
    """One Envoy with two worker threads: an outbound listener (reporter source) to a backend listener that answers
    with the exchange header, and a route to a port where nothing listens."""
    module = build(require=True)
    assert module is not None
    stats = NativeStats(str(module), str(tmp_path / EXPORT_FILE))
    admin, out, backend, closed = free_port(), free_port(), free_port(), free_port()
    answer = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
        "response_headers_to_add": [{"header": {"key": "x-envoy-peer-metadata", "value": ANSWER}}],
    }
    # The second route's cluster has an endpoint that refuses connections.
    down = {"match": {"prefix": "/down"}, "route": {"cluster": "nowhere"}, "name": "to-nowhere"}
    to_backend = {"match": {"prefix": "/"}, "route": {"cluster": "backend"}, "name": "to-backend"}
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                _listener("out", out, _hcm("out", [stats.http_filter("source")], down, to_backend)),
                _listener("backend", backend, _hcm("backend", [], answer)),
            ],
            "clusters": [
                {
                    "name": name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": name,
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}
                                        },
                                        "metadata": {"filter_metadata": {"istio": {"workload": "w;ns;app;v1;c1"}}},
                                    }
                                ]
                            }
                        ],
                    },
                }
                for name, p in (("backend", backend), ("nowhere", closed))
            ],
        },
    }
    with running_envoy(boot, tmp_path, concurrency=2) as admin_port:
        yield stats, out, admin_port


def _get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers)
        r = conn.getresponse()
        r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def _series(text: str) -> dict[tuple[str, str, str | None], float]:
    """(metric, raw tag unescaped, le) → value, for every line of the file."""
    out = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if m:
            raw = _UNESCAPE.sub(lambda e: "\n" if e.group(1) == "n" else e.group(1), m.group(2))
            out[(m.group(1), raw, m.group(3))] = float(m.group(4))
    return out


def _settled(stats: NativeStats, want: int) -> dict[tuple[str, str, str | None], float]:
    deadline = time.monotonic() + 10
    while True:
        got = _series(stats.read())
        counts = [v for (name, _, le), v in got.items() if name.endswith("duration_milliseconds_count")]
        if sum(counts) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def test_counts_facts_buckets_and_escapes(envoy: tuple[NativeStats, int, int]) -> None:
    stats, port, _ = envoy
    odd = 'text/x"y\\z'  # a caller's content type with a quote and a backslash
    for _ in range(4):
        status, headers = _get(port, "/ok", {"content-type": odd, "host": "svc.example"})
        assert status == 200
        # The answer is taken off the response: the application never sees the exchange.
        assert "x-envoy-peer-metadata" not in headers
    status, _ = _get(port, "/down", {"host": "svc.example"})
    assert status == 503

    got = _settled(stats, 5)
    raws = {raw for (_, raw, _) in got}
    assert len(raws) == 2, raws
    ok = next(r for r in raws if f"{SEPARATOR}200{SEPARATOR}" in r)
    down = next(r for r in raws if r != ok)
    fields = ok.split(SEPARATOR)
    # Version 3's order (filters._raw): response facts first, the request's facts last.
    assert fields[:4] == ["3", "source", "http", "200"]
    assert fields[5] == "-"  # no response flags
    assert fields[6] == "backend"
    assert fields[7] == "w;ns;app;v1;c1"  # the endpoint's istio metadata
    assert fields[10:] == ["", "to-backend", "svc.example", odd, ANSWER]
    parsed = Raw.parse(ok)
    assert parsed is not None and parsed.content_type == odd and parsed.peer == ANSWER
    down_fields = down.split(SEPARATOR)
    assert down_fields[3] == "503" and down_fields[5] == "UF"  # Envoy's short name for a refused connection
    assert down_fields[6] == "nowhere"

    for name in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
        assert got[(f"{name}_count", ok, None)] == 4, name
        assert got[(f"{name}_bucket", ok, "+Inf")] == 4, name
        les = [le for (n, r, le) in got if n == f"{name}_bucket" and r == ok and le not in (None, "+Inf")]
        assert [float(x or 0) for x in les] == sorted(float(x or 0) for x in les)
        cumulative = [got[(f"{name}_bucket", ok, le)] for le in les]
        assert cumulative == sorted(cumulative), (name, cumulative)
        assert got[(f"{name}_count", down, None)] == 1
    # Bytes: headers and body (request.total_size, response.total_size), as istio-proxy counts them.
    assert got[("istio_request_bytes_sum", ok, None)] > 4 * len(odd)
    assert got[("istio_response_bytes_sum", ok, None)] > 4 * len("ok\n")
    assert got[("istio_request_duration_milliseconds_bucket", ok, "10000")] == 4  # all well under 10 s

    # The agent renders the file with Envoy's own text: Istio's counter for the successful requests.
    metrics = IstioMetrics(LocalWorkload(workload="client", namespace="ns"), native=stats.read)
    text = metrics.render("")
    assert 'istio_requests_total{reporter="source"' in text
    assert any(line.endswith(" 4") and 'response_code="200"' in line for line in text.splitlines()), text


def test_every_worker_threads_requests_are_added_up(envoy: tuple[NativeStats, int, int]) -> None:
    """Each worker thread counts into its own table; the file is their sum."""
    stats, port, admin = envoy
    per_client, clients = 10, 12

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(per_client):
                conn.request("GET", "/ok", headers={"host": "svc.example"})
                r = conn.getresponse()
                r.read()
                assert r.status == 200
        finally:
            conn.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    got = _settled(stats, per_client * clients)
    counts = {raw: v for (name, raw, _), v in got.items() if name == "istio_request_duration_milliseconds_count"}
    assert list(counts.values()) == [per_client * clients], counts
    # Both workers took connections on the listener (else this proves nothing about adding tables up; the kernel
    # spreads 12 connections over two sockets, all on one has a chance of 1 in 2,048).
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
    conn.request("GET", f"/stats?filter=listener.127.0.0.1_{port}.worker_")
    body = conn.getresponse().read().decode()
    conn.close()
    taken = [int(line.rsplit(" ", 1)[1]) for line in body.splitlines() if "downstream_cx_total" in line]
    assert len([n for n in taken if n]) == 2, body


def test_a_configuration_without_a_file_or_reporter_is_refused(tmp_path: Path) -> None:
    """Envoy rejects what the module refuses, so a bad rewrite cannot pass unnoticed."""
    module = build(require=True)
    assert module is not None
    for value in ("source", "nobody|/tmp/x", "source|"):
        f = NativeStats(str(module), "/unused").http_filter("source")
        f["typed_config"]["value"]["filter_config"]["value"] = value
        route = {"match": {"prefix": "/"}, "direct_response": {"status": 200}}
        boot = {"static_resources": {"listeners": [_listener("l", free_port(), _hcm("l", [f], route))]}}
        path = tmp_path / "boot.json"
        path.write_text(json.dumps(boot))
        done = subprocess.run(
            [str(find_envoy_binary()), "--mode", "validate", "-c", str(path), "-l", "error"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0, value
