"""Two VMs (``vm-agent run``, real stock Envoy) on the local mesh: Istio's standard metrics on both sides.

The local mesh pushes what a default istiod pushes for telemetry (istio.metadata_exchange, istio.alpn,
istio.stats, the exchange ALPN); each agent rewrites it for stock Envoy. After N requests from the ``client`` VM
to the ``vmapp`` VM, both agents' merged ``/stats/prometheus`` carry ``istio_requests_total`` with exactly the
labels istio-proxy would put there for that pair (computed by tests/helpers/istio_metrics.py from the two
workloads' istioctl files), count N, duration histograms of N with Istio's default buckets, and TCP metrics for
a TCP port. Metric and label names are checked against Istio's published list.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.agent import AgentProcess, write_vm_files
from tests.helpers.istio_metrics import REFERENCE, Destination, Peer, expected_labels, find, series
from tests.helpers.mesh import running_mesh
from tests.helpers.net import free_port
from tests.integration.agent.test_agent_e2e import App, http_get
from vm_agent.telemetry.native.build import build as native_build

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NS = "telns"
N = 7
TCP_CONNECTIONS = 3


async def response_header_names(port: int) -> set[str]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/") as r:
        assert r.status == 200
        return {name.lower() for name in r.headers}


def manifests(app_port: int, svc_port: int, tcp_port: int, tcp_svc_port: int) -> str:
    return f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: {NS}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: vmsa, namespace: {NS}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: vmapp, namespace: {NS}}}
spec:
  metadata:
    labels: {{app: vmapp, version: v2}}
  template:
    serviceAccount: vmsa
    ports: {{http: {app_port}, tcp-echo: {tcp_port}}}
  probe:
    periodSeconds: 1
    tcpSocket: {{host: 127.0.0.1, port: {app_port}}}
---
apiVersion: v1
kind: Service
metadata: {{name: vmapp, namespace: {NS}}}
spec:
  selector: {{app: vmapp}}
  ports:
  - {{name: http, port: {svc_port}, targetPort: {app_port}}}
  - {{name: tcp-echo, port: {tcp_svc_port}, targetPort: {tcp_port}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client-sa, namespace: {NS}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: client, namespace: {NS}}}
spec:
  metadata:
    labels: {{app: client}}
  template:
    serviceAccount: client-sa
"""


@contextlib.contextmanager
def tcp_echo(port: int) -> Iterator[None]:
    srv = socket.create_server(("127.0.0.1", port))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                while data := conn.recv(65536):
                    conn.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(5)
        srv.close()


def tcp_roundtrip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def ip() -> str:
    return f"127.0.{random.randint(10, 250)}.{random.randint(2, 250)}"


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Any]:
    async with running_mesh(tmp_path, grace_period_s=30.0) as m:
        yield m


def metrics(agent: AgentProcess) -> str:
    code, body = agent.get(agent.status_url + "/stats/prometheus", timeout=5)
    assert code == 200
    return body.decode()


def check_names(text: str) -> None:
    """Every istio_* series uses a published metric name and exactly the published labels."""
    known = {**REFERENCE["http_metrics"], **REFERENCE["tcp_metrics"], **REFERENCE["grpc_metrics"]}
    for name, labels, _ in series(text):
        if not name.startswith("istio_") or name == "istio_build":
            continue
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix) in known:
                base = name.removesuffix(suffix)
        assert base in known, name
        wanted = set(REFERENCE["labels"])
        if base in REFERENCE["tcp_metrics"]:
            wanted -= set(REFERENCE["http_only_labels"])
        if name.endswith("_bucket"):
            wanted.add("le")
        assert set(labels) == wanted, (name, set(labels) ^ wanted)


@pytest.mark.parametrize("native", [True, False], ids=["native-stats", "stock-filters"])
async def test_istio_metrics_on_both_vms(tmp_path: Path, mesh: Any, native: bool) -> None:
    """The same labels and counts whether the shipped Envoy counts with the native stats filter (the default
    where it was built) or with the stock filters (any other Envoy)."""
    app_port, svc_port, tcp_port, tcp_svc_port = free_port(), free_port(), free_port(), free_port()
    mesh.apply_yaml(manifests(app_port, svc_port, tcp_port, tcp_svc_port), source="test")
    app = App(app_port)
    await app.start()
    server_files = write_vm_files(mesh, namespace=NS, group="vmapp", out=tmp_path / "srv", internal_ip=ip())
    client_files = write_vm_files(mesh, namespace=NS, group="client", out=tmp_path / "cli", internal_ip=ip())
    extra = {"VM_AGENT_NATIVE_STATS": "true" if native else "false"}
    if native:
        assert native_build(require=True) is not None
    server = AgentProcess(server_files, instance_ip=ip(), extra=extra)
    client = AgentProcess(client_files, instance_ip=ip(), extra=extra)
    server.start()
    client.start()
    try:
        with tcp_echo(tcp_port):
            await server.wait(server.ready, 60, "server ready")
            await client.wait(client.ready, 60, "client ready")
            ok = 0
            deadline = time.monotonic() + 30
            while ok == 0 and time.monotonic() < deadline:
                status, _ = await http_get(svc_port)
                ok += status == 200
                await asyncio.sleep(0.2)
            for _ in range(N - ok):
                status, body = await http_get(svc_port)
                assert (status, body) == (200, "hello from the VM app")
            for i in range(TCP_CONNECTIONS):
                payload = f"tcp bytes {i}\n".encode()
                assert await asyncio.to_thread(tcp_roundtrip, tcp_svc_port, payload) == payload

        for agent in (server, client):
            code, dump = agent.get(f"http://127.0.0.1:{agent.ports.admin}/config_dump", timeout=10)
            assert code == 200
            # What Envoy actually runs: the module filter on HTTP chains, or the stock filters' metadata rule.
            assert (b"vm_agent_istio_stats" in dump) == native
            if agent is client:
                assert (b"istio.metadata_exchange.discovery" in dump) != native

        src = Peer.from_cluster_env(client_files / "cluster.env")
        dst = Peer.from_cluster_env(server_files / "cluster.env")
        assert dst.principal == f"spiffe://cluster.local/ns/{NS}/sa/vmsa"
        service = Destination(f"vmapp.{NS}.svc.cluster.local", "vmapp", NS)
        for agent, reporter in ((server, "destination"), (client, "source")):
            want = expected_labels(reporter, src, dst, service)

            def settled(agent: AgentProcess = agent, want: dict[str, str] = want) -> bool:
                # Envoy merges histograms on its stats flush (every 5 s); counters are immediate.
                text = metrics(agent)
                hist = find(text, "istio_request_duration_milliseconds_count", **want)
                return bool(hist) and hist[0][1] == N

            await agent.wait(settled, 30, f"{reporter} histograms of {N} requests")
            text = metrics(agent)
            check_names(text)
            total = [
                (labels, v)
                for labels, v in find(text, "istio_requests_total", reporter=reporter, response_code="200")
                if v
            ]
            assert [labels for labels, _ in total] == [want], (
                reporter,
                [({k: v for k, v in lbl.items() if want.get(k) != v}, n) for lbl, n in total],
            )
            assert total[0][1] == N
            for hist in ("istio_request_duration_milliseconds", "istio_request_bytes", "istio_response_bytes"):
                assert find(text, f"{hist}_count", **want)[0][1] == N, hist
                les = [float(lbl["le"]) for lbl, _ in find(text, f"{hist}_bucket", **want) if lbl["le"] != "+Inf"]
                assert les == REFERENCE["default_buckets"], hist
            assert find(text, "istio_request_bytes_sum", **want)[0][1] > 0
            assert find(text, "istio_build", component="proxy")

        # TCP: the client labels the destination from the endpoint's istio metadata and the server's certificate;
        # the server labels the client from its certificate (stock Envoy reads no TCP exchange preamble).
        tcp_service = {"destination_service": service.host, "destination_service_name": "vmapp"}
        client_tcp = find(metrics(client), "istio_tcp_sent_bytes_total", reporter="source", **tcp_service)
        assert client_tcp, metrics(client)[-3000:]
        labels, sent = client_tcp[0]
        assert sent > 0
        assert labels["destination_workload"] == "vmapp"
        assert labels["destination_workload_namespace"] == NS
        assert labels["destination_principal"] == dst.principal
        assert labels["source_principal"] == src.principal
        assert labels["request_protocol"] == "tcp"
        opened = find(metrics(client), "istio_tcp_connections_opened_total", reporter="source", **tcp_service)
        assert opened[0][1] == TCP_CONNECTIONS
        server_tcp = find(metrics(server), "istio_tcp_received_bytes_total", reporter="destination", **tcp_service)
        labels, received = server_tcp[0]
        assert received > 0
        assert labels["source_principal"] == src.principal
        assert labels["source_workload_namespace"] == NS
        assert labels["source_workload"] == "unknown"
        assert labels["connection_security_policy"] == "mutual_tls"
        closed = find(metrics(server), "istio_tcp_connections_closed_total", reporter="destination", **tcp_service)
        assert closed[0][1] == TCP_CONNECTIONS
        # Istio's exchange headers stay between the two Envoys: neither application sees them (after the counts:
        # this is one more request).
        exchange = {"x-envoy-peer-metadata", "x-envoy-peer-metadata-id"}
        assert not exchange & app.seen_header_names, app.seen_header_names
        assert not exchange & await response_header_names(svc_port)
    finally:
        client.cleanup()
        server.cleanup()
        await app.stop()
