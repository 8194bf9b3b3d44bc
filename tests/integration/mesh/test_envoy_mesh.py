"""Two real Envoys connected straight to the local mesh (one over Delta ADS, one over SotW) receive
listeners, clusters and endpoints, and carry HTTP between two local apps over mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.apps import echo_app, get_json, serving
from tests.helpers.mesh import MeshServer, running_mesh
from tests.helpers.net import free_port
from tests.integration.mesh.envoy_support import admin_get, bootstrap, running_envoy, sds_server
from tests.integration.mesh.xds_client import CDS, EDS, LDS, RDS, issue_cert

pytestmark = pytest.mark.integration

MESH = """
apiVersion: v1
kind: Namespace
metadata: {{name: vm-ns}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: sa-a, namespace: vm-ns}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: sa-b, namespace: vm-ns}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: a, namespace: vm-ns}}
spec:
  metadata: {{labels: {{app: a}}}}
  template: {{serviceAccount: sa-a, ports: {{http: {pa}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: b, namespace: vm-ns}}
spec:
  metadata: {{labels: {{app: b}}}}
  template: {{serviceAccount: sb-placeholder, ports: {{http: {pb}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: svc-a, namespace: vm-ns}}
spec: {{selector: {{app: a}}, ports: [{{name: http, port: {sa}, targetPort: {pa}}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: svc-b, namespace: vm-ns}}
spec: {{selector: {{app: b}}, ports: [{{name: http, port: {sb}, targetPort: {pb}}}]}}
""".replace("sb-placeholder", "sa-b")


@contextlib.asynccontextmanager
async def _vm(mesh: MeshServer, work: Path, ip: str, group: str, sa: str, *, delta: bool) -> AsyncIterator[int]:
    work.mkdir(parents=True, exist_ok=True)
    key_pem, chain_pem = await issue_cert(mesh.xds_address, mesh.root_cert_pem, mesh.mint_token("vm-ns", sa))
    metadata = {
        "NAMESPACE": "vm-ns",
        "SERVICE_ACCOUNT": sa,
        "CLUSTER_ID": "Kubernetes",
        "INSTANCE_IPS": ip,
        "INTERCEPTION_MODE": "NONE",
        "AUTO_REGISTER_GROUP": group,
        "LABELS": {"app": group},
        "ISTIO_VERSION": "1.28.0",
    }
    sock = work / "sds.sock"
    async with sds_server(sock, key_pem, chain_pem, mesh.root_cert_pem) as sds:
        boot = bootstrap(
            node_id=f"sidecar~{ip}~{group}.vm-ns~vm-ns.svc.cluster.local",
            metadata=metadata,
            xds_address=mesh.xds_address,
            client_key_pem=key_pem,
            client_chain_pem=chain_pem,
            root_pem=mesh.root_cert_pem,
            sds_socket=sock,
            admin_port=free_port(),
            delta=delta,
        )
        async with running_envoy(boot, work) as admin:
            yield admin
            assert {"default", "ROOTCA"} <= sds.served


async def _until_ok(port: int, path: str, timeout: float = 15.0) -> tuple[int, dict[str, Any]]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while loop.time() < deadline:
        try:
            status, body = await asyncio.to_thread(get_json, port, path, timeout=5)
            if status == 200:
                return status, body
            last = status
        except OSError as e:
            last = e
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no 200 from 127.0.0.1:{port}{path}: last {last!r}")


async def test_two_envoys_mtls_through_the_local_mesh(tmp_path: Path) -> None:
    with serving(echo_app("a")) as pa, serving(echo_app("b")) as pb:
        sa, sb = free_port(), free_port()
        # Envoys connect straight to the mesh here (no agent to fit istiod's telemetry filters to stock Envoy).
        async with running_mesh(tmp_path, MESH.format(pa=pa, pb=pb, sa=sa, sb=sb), istio_telemetry=False) as mesh:
            await _exercise(mesh, tmp_path, pa=pa, pb=pb, sa=sa, sb=sb)
            # Both Envoys are gone: their streams close and the entries are marked disconnected.
            for _ in range(100):
                if not mesh.ads.connections:
                    break
                await asyncio.sleep(0.05)
            assert mesh.ads.connections == {}
            for entry in mesh.workload_entries():
                assert "istio.io/disconnectedAt" in entry["metadata"]["annotations"]


async def _exercise(mesh: MeshServer, tmp_path: Path, *, pa: int, pb: int, sa: int, sb: int) -> None:
    async with (
        _vm(mesh, tmp_path / "a", "127.0.0.2", "a", "sa-a", delta=True) as admin_a,
        _vm(mesh, tmp_path / "b", "127.0.0.3", "b", "sa-b", delta=False) as admin_b,
    ):
        # A's app calls svc-b on A's loopback listener; B's app sees A's SPIFFE identity.
        _, body = await _until_ok(sb, "/from-a")
        assert body["app"] == "b" and body["path"] == "/from-a"
        xfcc = body["headers"]["x-forwarded-client-cert"]
        assert "URI=spiffe://cluster.local/ns/vm-ns/sa/sa-a" in xfcc
        assert "By=spiffe://cluster.local/ns/vm-ns/sa/sa-b" in xfcc
        _, body = await _until_ok(sa, "/from-b")
        assert body["app"] == "a"
        assert "URI=spiffe://cluster.local/ns/vm-ns/sa/sa-b" in body["headers"]["x-forwarded-client-cert"]
        # B's inbound listener refuses plaintext.
        with pytest.raises((http.client.HTTPException, OSError)):
            await asyncio.to_thread(get_json, pb, "/plain", ip="127.0.0.3", timeout=5)

        # Both flavours got every type and ACKed it; nothing was NACKed.
        conns = {c["node_id"].split("~")[1]: c for c in mesh.ads.snapshot()["connections"]}
        assert conns["127.0.0.2"]["flavor"] == "delta" and conns["127.0.0.3"]["flavor"] == "sotw"
        for conn in conns.values():
            assert conn["authenticated_by"] == "client-cert"
            for t in (CDS, EDS, LDS):
                assert conn["types"][t]["acked"] is not None, (conn["node_id"], t)
            assert all(s["nacked"] is None for s in conn["types"].values()), conn["types"]
        assert RDS in conns["127.0.0.2"]["types"]
        # The auto-registered entries are the endpoints, and Envoy has them.
        names = sorted(e["metadata"]["name"] for e in mesh.workload_entries())
        assert names == ["a-127.0.0.2", "b-127.0.0.3"]
        clusters_a = await admin_get(admin_a, "/clusters")
        assert f"outbound|{sb}||svc-b.vm-ns.svc.cluster.local::127.0.0.3:{pb}::" in clusters_a
        listeners_b = await admin_get(admin_b, "/listeners")
        assert f"127.0.0.3_{pb}::127.0.0.3:{pb}" in listeners_b
