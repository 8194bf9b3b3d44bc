"""A restarted mesh keeps its objects (like an API server), keeps ClusterIPs and uids, and treats the
proxies of the previous run as disconnected."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from tests.helpers.mesh import running_mesh
from tests.integration.mesh.xds_client import CDS, VM_MANIFESTS, ads, node

pytestmark = pytest.mark.integration

EXTRA = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: vm-ns}
spec:
  hosts: [payments.example.internal]
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
"""


async def test_objects_survive_restart(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "base.yaml").write_text(VM_MANIFESTS)
    async with running_mesh(tmp_path, manifests_dir=folder, grace_period_s=0.5) as mesh:
        mesh.apply_yaml(EXTRA)
        svc = mesh.store.get("Service", "vm-ns", "vm-app")
        assert svc is not None
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=mesh.mint_token("vm-ns", "vm-sa")) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node()))
            await c.recv_type(CDS)
            assert [e["metadata"]["name"] for e in mesh.workload_entries()] == ["vm-app-127.0.0.2"]
            # Stop the mesh while the proxy is still connected.
            await asyncio.sleep(0.3)  # let the debounced write land
            vips = dict(mesh.vips)

    async with running_mesh(tmp_path, manifests_dir=folder, grace_period_s=0.5) as mesh:
        assert mesh.store.get("ServiceEntry", "vm-ns", "payments") is not None  # applied through the API
        again = mesh.store.get("Service", "vm-ns", "vm-app")
        assert again is not None
        assert again["spec"]["clusterIP"] == svc["spec"]["clusterIP"]
        assert again["metadata"]["uid"] == svc["metadata"]["uid"]
        assert mesh.vips == vips
        entry = mesh.workload_entries()[0]
        assert "istio.io/disconnectedAt" in entry["metadata"]["annotations"]
        assert "istio.io/connectedAt" not in entry["metadata"]["annotations"]
        for _ in range(60):
            if not mesh.workload_entries():
                break
            await asyncio.sleep(0.05)
        assert mesh.workload_entries() == []

    # A folder edit made while the mesh was down wins over the restored copy.
    (folder / "base.yaml").write_text(
        VM_MANIFESTS.replace("ports: [{name: http, port: 8080, targetPort: 8080}]", "ports: [{name: http, port: 9090}]")
    )
    async with running_mesh(tmp_path, manifests_dir=folder) as mesh:
        svc3 = mesh.store.get("Service", "vm-ns", "vm-app")
        assert svc3 is not None and svc3["spec"]["ports"][0]["port"] == 9090
        assert svc3["spec"]["clusterIP"] == svc["spec"]["clusterIP"]
