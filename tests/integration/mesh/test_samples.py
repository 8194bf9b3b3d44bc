"""The demo samples: they load, give a VM its files, and show up in its NameTable."""

from __future__ import annotations

from pathlib import Path

import pytest
from envoy.service.discovery.v3 import discovery_pb2

from tests.helpers.mesh import running_mesh
from tests.integration.mesh.xds_client import CDS, ads, node
from vm_agent.mesh.cli import mesh_vm_files
from vm_agent.mesh.samples import samples_dir
from vm_agent.proto import NAME_TABLE_TYPE_URL, nds_pb2

pytestmark = pytest.mark.integration


async def test_samples_serve_a_vm(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, manifests_dir=samples_dir()) as mesh:
        assert mesh.manifests is not None and mesh.manifests.last_error is None
        kinds = sorted(o["kind"] for o in mesh.store.select(namespace="vm-demo"))
        assert kinds == ["Service", "ServiceAccount", "ServiceEntry", "WorkloadGroup"]

        out = tmp_path / "vm"
        rc = await mesh_vm_files(
            state=mesh.settings.state_dir,
            group="vm-app",
            namespace="vm-demo",
            out=out,
            internal_ip="127.0.0.2",
            autoregister=True,
        )
        assert rc == 0
        env = (out / "cluster.env").read_text()
        assert "SERVICE_ACCOUNT='vm-app'\n" in env and "ISTIO_META_DNS_CAPTURE='true'\n" in env
        token = (out / "istio-token").read_text()

        async with ads(mesh.xds_address, (out / "root-cert.pem").read_bytes(), token=token) as c:
            await c.send(
                discovery_pb2.DiscoveryRequest(
                    type_url=CDS, node=node(namespace="vm-demo", service_account="vm-app", group="vm-app")
                )
            )
            await c.recv_type(CDS)
            await c.send(discovery_pb2.DiscoveryRequest(type_url=NAME_TABLE_TYPE_URL))
            nds = await c.recv_type(NAME_TABLE_TYPE_URL)
            table = nds_pb2.NameTable()
            nds.resources[0].Unpack(table)
            svc = table.table["vm-app.vm-demo.svc.cluster.local"]
            assert svc.registry == "Kubernetes" and svc.shortname == "vm-app" and svc.namespace == "vm-demo"
            ext = table.table["api.example.internal"]
            assert ext.registry == "External" and ext.ips[0].startswith("240.240.")
            entries = mesh.workload_entries()
            assert [e["metadata"]["name"] for e in entries] == ["vm-app-127.0.0.2"]
            assert entries[0]["metadata"]["annotations"]["proxy.istio.io/health-checks-enabled"] == "true"
