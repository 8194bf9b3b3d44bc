"""Auto-registration, health conditions, disconnect marks and the grace period, like istiod's
WorkloadEntry controller, driven by a plain grpcio ADS client."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from tests.helpers.mesh import MeshServer, running_mesh
from tests.integration.mesh.xds_client import CDS, EDS, VM_MANIFESTS, ads, node
from vm_agent.proto import HEALTH_INFO_TYPE_URL

pytestmark = pytest.mark.integration


def _entry(mesh: MeshServer, name: str) -> dict[str, Any] | None:
    for e in mesh.workload_entries():
        if e["metadata"]["name"] == name:
            return e
    return None


async def _until(check: Any, timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def test_registration_rejections(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS, plaintext_listen="127.0.0.1:0") as mesh:
        addr, root = mesh.xds_address, mesh.root_cert_pem
        async with ads(addr, root, token=mesh.mint_token("vm-ns", "vm-sa")) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group="missing-group")))
            assert await c.status() == grpc.StatusCode.FAILED_PRECONDITION
            assert "cannot find WorkloadGroup vm-ns/missing-group" in await c.details()
        # The caller is vm-ns/other-sa (and says so), but the group's template wants vm-sa.
        async with ads(addr, root, token=mesh.mint_token("vm-ns", "other-sa")) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(service_account="other-sa")))
            assert await c.status() == grpc.StatusCode.UNKNOWN
            assert "service account vm-sa does not match" in await c.details()
        # Plaintext: no verified identity, so no registration.
        assert mesh.plaintext_address is not None
        async with grpc.aio.insecure_channel(mesh.plaintext_address) as ch:
            stub = ch.stream_stream(
                "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources",
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
            call = stub()
            await call.write(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node()))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call.read()
            assert "requires a verified identity" in (info.value.details() or "")
        assert mesh.workload_entries() == []


async def test_register_health_disconnect_grace(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS, grace_period_s=0.6) as mesh:
        addr, root = mesh.xds_address, mesh.root_cert_pem
        token = mesh.mint_token("vm-ns", "vm-sa")
        async with ads(addr, root, token=token) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node()))
            await c.recv_type(CDS)
            e = _entry(mesh, "vm-app-127.0.0.2")
            assert e is not None
            wg = next(o for o in mesh.store.select("WorkloadGroup") if o["metadata"]["name"] == "vm-app")
            ann = e["metadata"]["annotations"]
            assert ann["istio.io/autoRegistrationGroup"] == "vm-app"
            assert ann["proxy.istio.io/health-checks-enabled"] == "true"
            assert ann["istio.io/workloadController"] == mesh.settings.controller_name
            assert ann["istio.io/connectedAt"].endswith("Z")
            assert ann["owner"] == "tests"
            assert "istio.io/disconnectedAt" not in ann
            assert e["spec"] == {
                "address": "127.0.0.2",
                "serviceAccount": "vm-sa",
                "ports": {"http": 8080},
                "labels": {"app": "vm-app", "version": "v1"},
            }
            assert e["metadata"]["labels"] == {"app": "vm-app", "version": "v1"}
            assert e["metadata"]["ownerReferences"] == [
                {
                    "apiVersion": "networking.istio.io/v1",
                    "kind": "WorkloadGroup",
                    "name": "vm-app",
                    "uid": wg["metadata"]["uid"],
                    "controller": True,
                }
            ]
            # Health-checked and no report yet: not an endpoint of the Service.
            eds_name = "outbound|8080||vm-app.vm-ns.svc.cluster.local"
            await c.send(discovery_pb2.DiscoveryRequest(type_url=EDS, resource_names=[eds_name]))
            eds = await c.recv_type(EDS)
            assert "127.0.0.2" not in str(eds.resources[0].value)
            await c.send(discovery_pb2.DiscoveryRequest(type_url=HEALTH_INFO_TYPE_URL))
            await _until(lambda: (_entry(mesh, "vm-app-127.0.0.2") or {}).get("status") is not None)
            cond = _entry(mesh, "vm-app-127.0.0.2")["status"]["conditions"][0]  # type: ignore[index]
            assert cond["type"] == "Healthy" and cond["status"] == "True" and "message" not in cond
            # Becoming healthy made it an endpoint: EDS is pushed.
            eds = await c.recv_type(EDS, timeout=5.0)
            assert b"127.0.0.2" in eds.resources[0].value
            await c.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=HEALTH_INFO_TYPE_URL, error_detail=status_pb2.Status(code=13, message="probe: 503")
                )
            )
            await _until(
                lambda: _entry(mesh, "vm-app-127.0.0.2")["status"]["conditions"][0]["status"] == "False"  # type: ignore[index]
            )
            assert _entry(mesh, "vm-app-127.0.0.2")["status"]["conditions"][0]["message"] == "probe: 503"  # type: ignore[index]
            uid = e["metadata"]["uid"]
        # Disconnected: marked, then a reconnect within the grace period keeps the same entry.
        await _until(lambda: "istio.io/disconnectedAt" in _entry(mesh, "vm-app-127.0.0.2")["metadata"]["annotations"])  # type: ignore[index]
        assert "istio.io/connectedAt" not in _entry(mesh, "vm-app-127.0.0.2")["metadata"]["annotations"]  # type: ignore[index]
        async with ads(addr, root, token=token, delta=True) as c:
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, node=node()))
            await c.recv_type(CDS)
            await asyncio.sleep(0.9)  # longer than the grace period
            e = _entry(mesh, "vm-app-127.0.0.2")
            assert e is not None and e["metadata"]["uid"] == uid
            assert "istio.io/connectedAt" in e["metadata"]["annotations"]
            assert "istio.io/disconnectedAt" not in e["metadata"]["annotations"]
        # Gone for longer than the grace period: deleted.
        await _until(lambda: _entry(mesh, "vm-app-127.0.0.2") is None, timeout=3.0)


async def test_entry_name_network_and_no_probe(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        async with (
            ads(mesh.xds_address, mesh.root_cert_pem, token=token) as a,
            ads(mesh.xds_address, mesh.root_cert_pem, token=token) as b,
        ):
            await a.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=CDS, node=node("127.0.0.3", probe=False, extra={"NETWORK": "net1"})
                )
            )
            await a.recv_type(CDS)
            await b.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node("::1")))
            await b.recv_type(CDS)
            e = _entry(mesh, "vm-app-127.0.0.3-net1")
            assert e is not None and e["spec"]["network"] == "net1"
            assert "proxy.istio.io/health-checks-enabled" not in e["metadata"]["annotations"]
            assert _entry(mesh, "vm-app---1") is not None
        # Deleting the group removes the entries it owns.
        assert mesh.delete("WorkloadGroup", "vm-ns", "vm-app")
        assert mesh.workload_entries() == []
