"""Proxies bound to a manually created WorkloadEntry (metadata WORKLOAD_ENTRY), and the clusterid
check on ADS streams."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2

from tests.helpers.mesh import MeshServer, running_mesh
from tests.integration.mesh.xds_client import CDS, VM_MANIFESTS, ads, issue_cert, node
from vm_agent.proto import HEALTH_INFO_TYPE_URL

pytestmark = pytest.mark.integration

MANUAL = """
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata:
  name: checked
  namespace: vm-ns
  annotations: {proxy.istio.io/health-checks-enabled: "true"}
spec: {address: 127.0.0.5, serviceAccount: vm-sa, labels: {app: vm-app}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: plain, namespace: vm-ns}
spec: {address: 127.0.0.6, serviceAccount: vm-sa, labels: {app: vm-app}}
"""


def _get(mesh: MeshServer, name: str) -> dict[str, Any]:
    e = mesh.store.get("WorkloadEntry", "vm-ns", name)
    assert e is not None
    return e


async def _until(check: Any, timeout: float = 3.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not reached")


async def test_manual_entries(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS + "---\n" + MANUAL, grace_period_s=0.4) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        # Health-checked manual entry: the mesh takes control and records health.
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token) as c:
            meta = {"WORKLOAD_ENTRY": "checked"}
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node("127.0.0.5", group=None, extra=meta)))
            await c.recv_type(CDS)
            ann = _get(mesh, "checked")["metadata"]["annotations"]
            assert ann["istio.io/workloadController"] == mesh.settings.controller_name
            await c.send(discovery_pb2.DiscoveryRequest(type_url=HEALTH_INFO_TYPE_URL))
            await _until(lambda: "status" in _get(mesh, "checked"))
            assert _get(mesh, "checked")["status"]["conditions"][0]["status"] == "True"
        # After the grace period a manual entry is kept, only its Healthy condition goes.
        await _until(lambda: not (_get(mesh, "checked").get("status") or {}).get("conditions"))
        assert "istio.io/disconnectedAt" in _get(mesh, "checked")["metadata"]["annotations"]

        # Without the annotation the mesh leaves the entry alone (and ignores health).
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token) as c:
            meta = {"WORKLOAD_ENTRY": "plain"}
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node("127.0.0.6", group=None, extra=meta)))
            await c.recv_type(CDS)
            await c.send(discovery_pb2.DiscoveryRequest(type_url=HEALTH_INFO_TYPE_URL))
            await asyncio.sleep(0.2)
            plain = _get(mesh, "plain")
            assert "annotations" not in plain["metadata"] and "status" not in plain

        # A missing entry fails the stream.
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token) as c:
            meta = {"WORKLOAD_ENTRY": "ghost"}
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node("127.0.0.7", group=None, extra=meta)))
            assert await c.status() == grpc.StatusCode.UNKNOWN
            assert "ghost" in await c.details()


async def test_ads_clusterid(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token, cluster_id="") as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group=None)))
            assert (await c.recv_type(CDS)).resources
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token, cluster_id="elsewhere") as c:
            assert await c.status() == grpc.StatusCode.UNAUTHENTICATED
        # The client-certificate authenticator comes first and does not look at clusterid.
        cert = await issue_cert(mesh.xds_address, mesh.root_cert_pem, token)
        async with ads(mesh.xds_address, mesh.root_cert_pem, client=cert, cluster_id="elsewhere") as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group=None)))
            assert (await c.recv_type(CDS)).resources
