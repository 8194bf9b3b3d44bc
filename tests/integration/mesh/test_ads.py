"""ADS on the local mesh, SotW and Delta, driven by a plain grpcio client: admission, version/nonce,
ACK/NACK, and pushes on change."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2

from tests.helpers.mesh import running_mesh
from tests.integration.mesh.xds_client import CDS, EDS, LDS, VM_MANIFESTS, ads, issue_cert, node
from vm_agent.proto import HEALTH_INFO_TYPE_URL, NAME_TABLE_TYPE_URL, nds_pb2

pytestmark = pytest.mark.integration

NEW_SERVICE = """
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: vm-ns}
spec:
  clusterIP: 10.96.7.7
  ports: [{name: http, port: 9080}]
"""


def _names(resp: discovery_pb2.DiscoveryResponse, msg_type: type) -> set[str]:
    out = set()
    for res in resp.resources:
        m = msg_type()
        res.Unpack(m)
        out.add(m.name)
    return out


async def test_admission_rejections(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        addr, root = mesh.xds_address, mesh.root_cert_pem
        token = mesh.mint_token("vm-ns", "vm-sa")
        # No credentials on the TLS port: refused as the stream opens, before any request (like istiod).
        async with ads(addr, root) as c:
            assert await c.status() == grpc.StatusCode.UNAUTHENTICATED
        # No node on the first request.
        async with ads(addr, root, token=token) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS))
            assert await c.status() == grpc.StatusCode.INVALID_ARGUMENT
        # A node id that does not parse.
        async with ads(addr, root, token=token) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group=None, node_id="sidecar~x")))
            assert await c.status() == grpc.StatusCode.INVALID_ARGUMENT
        # Identity in another namespace / another service account than the node claims.
        async with ads(addr, root, token=mesh.mint_token("default", "default")) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group=None)))
            assert await c.status() == grpc.StatusCode.PERMISSION_DENIED
        async with ads(addr, root, token=mesh.mint_token("vm-ns", "other-sa")) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group=None)))
            assert await c.status() == grpc.StatusCode.PERMISSION_DENIED
        # A health request as the very first message is ignored; the stream then works.
        async with ads(addr, root, token=token) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=HEALTH_INFO_TYPE_URL))
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group=None)))
            resp = await c.recv_type(CDS)
            assert resp.resources
        assert mesh.workload_entries() == []


async def test_sotw_version_nonce_ack_nack_and_push(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group=None)))
            cds = await c.recv_type(CDS)
            assert cds.version_info and cds.nonce
            from envoy.config.cluster.v3 import cluster_pb2

            clusters = _names(cds, cluster_pb2.Cluster)
            assert "outbound|8080||vm-app.vm-ns.svc.cluster.local" in clusters
            await c.send(
                discovery_pb2.DiscoveryRequest(type_url=CDS, version_info=cds.version_info, response_nonce=cds.nonce)
            )
            await c.send(discovery_pb2.DiscoveryRequest(type_url=LDS))
            lds = await c.recv_type(LDS)
            await c.send(discovery_pb2.DiscoveryRequest(type_url=NAME_TABLE_TYPE_URL))
            nds = await c.recv_type(NAME_TABLE_TYPE_URL)
            table = nds_pb2.NameTable()
            nds.resources[0].Unpack(table)
            assert "vm-app.vm-ns.svc.cluster.local" in table.table
            # ACK of CDS: nothing more is sent for it.
            await c.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=NAME_TABLE_TYPE_URL, version_info=nds.version_info, response_nonce=nds.nonce
                )
            )
            # NACK of LDS is recorded and does not trigger a resend.
            await c.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=LDS,
                    response_nonce=lds.nonce,
                    error_detail=status_pb2.Status(code=13, message="bad listener"),
                )
            )
            await c.expect_nothing(0.3)
            conn = mesh.ads.snapshot()["connections"][0]
            assert conn["types"][CDS]["acked"]["nonce"] == cds.nonce
            assert conn["types"][LDS]["nacked"]["message"] == "bad listener"
            # EDS is not a wildcard type: naming no clusters gets none.
            await c.send(discovery_pb2.DiscoveryRequest(type_url=EDS))
            assert len((await c.recv_type(EDS)).resources) == 0
            # A stale nonce (an answer to an older response) is ignored.
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, response_nonce="stale", resource_names=["x"]))
            await c.expect_nothing(0.3)
            # A change pushes new CDS and a new NameTable within 1 s.
            mesh.apply_yaml(NEW_SERVICE)
            cds2 = await c.recv_type(CDS, timeout=5.0)
            assert "outbound|9080||reviews.vm-ns.svc.cluster.local" in _names(cds2, cluster_pb2.Cluster)
            assert cds2.version_info != cds.version_info and cds2.nonce != cds.nonce
            nds2 = await c.recv_type(NAME_TABLE_TYPE_URL, timeout=5.0)
            nds2.resources[0].Unpack(table)
            assert list(table.table["reviews.vm-ns.svc.cluster.local"].ips) == ["10.96.7.7"]


async def test_delta_subscriptions_versions_and_removals(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token, delta=True) as c:
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, node=node(group=None)))
            cds = await c.recv_type(CDS)
            versions = {r.name: r.version for r in cds.resources}
            assert "outbound|8080||vm-app.vm-ns.svc.cluster.local" in versions
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=cds.nonce))
            eds_name = "outbound|8080||vm-app.vm-ns.svc.cluster.local"
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=[eds_name]))
            eds = await c.recv_type(EDS)
            assert [r.name for r in eds.resources] == [eds_name]
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, response_nonce=eds.nonce))
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE_URL))
            nds = await c.recv_type(NAME_TABLE_TYPE_URL)
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE_URL, response_nonce=nds.nonce))
            await c.expect_nothing(0.3)
            # Adding a service sends only the new cluster; removing it sends its name in removed_resources.
            mesh.apply_yaml(NEW_SERVICE)
            added = await c.recv_type(CDS, timeout=5.0)
            assert [r.name for r in added.resources] == ["outbound|9080||reviews.vm-ns.svc.cluster.local"]
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=added.nonce))
            nds2 = await c.recv_type(NAME_TABLE_TYPE_URL, timeout=5.0)
            table = nds_pb2.NameTable()
            nds2.resources[0].resource.Unpack(table)
            assert "reviews.vm-ns.svc.cluster.local" in table.table
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE_URL, response_nonce=nds2.nonce))
            assert mesh.delete("Service", "vm-ns", "reviews")
            gone = await c.recv_type(CDS, timeout=5.0)
            assert list(gone.removed_resources) == ["outbound|9080||reviews.vm-ns.svc.cluster.local"]
            assert not gone.resources
        # Reconnect with initial_resource_versions: unchanged resources are not sent again.
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token, delta=True) as c:
            await c.send(
                discovery_pb2.DeltaDiscoveryRequest(
                    type_url=CDS, node=node(group=None), initial_resource_versions=versions
                )
            )
            again = await c.recv_type(CDS)
            assert not again.resources and not again.removed_resources


async def test_client_certificate_admits_ads_stream(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        cert = await issue_cert(mesh.xds_address, mesh.root_cert_pem, mesh.mint_token("vm-ns", "vm-sa"))
        async with ads(mesh.xds_address, mesh.root_cert_pem, client=cert) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node(group=None)))
            assert (await c.recv_type(CDS)).resources
            conn = mesh.ads.snapshot()["connections"][0]
            assert conn["authenticated_by"] == "client-cert"
            assert conn["identities"] == ["spiffe://cluster.local/ns/vm-ns/sa/vm-sa"]
        await asyncio.sleep(0)


async def test_max_stream_age_ends_the_stream_cleanly(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS, max_stream_age_s=0.5) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node()))
            await c.recv_type(CDS)
            assert await c.status() == grpc.StatusCode.OK
        entry = mesh.workload_entries()[0]
        assert "istio.io/disconnectedAt" in entry["metadata"]["annotations"]
