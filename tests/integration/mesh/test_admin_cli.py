"""Admin API, CLI back-ends, the manifests folder (live reload, refusal keeps the last good state)
and vm-files, against a running local mesh."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from envoy.service.discovery.v3 import discovery_pb2

from tests.helpers.mesh import running_mesh
from tests.integration.mesh.xds_client import CDS, VM_MANIFESTS, ads, issue_cert, node
from vm_agent.mesh.cli import mesh_apply, mesh_delete, mesh_get, mesh_vm_files
from vm_agent.proto import NAME_TABLE_TYPE_URL, nds_pb2

pytestmark = pytest.mark.integration

EXTRA = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: vm-ns}
spec:
  hosts: [payments.example.internal]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
"""

BAD = """
apiVersion: v1
kind: Service
metadata: {name: broken, namespace: vm-ns}
spec:
  ports: [{port: 99999}]
"""


async def test_admin_api_and_cli_backends(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token) as c:
            await c.send(discovery_pb2.DiscoveryRequest(type_url=CDS, node=node()))
            cds = await c.recv_type(CDS)
            await c.send(
                discovery_pb2.DiscoveryRequest(type_url=CDS, version_info=cds.version_info, response_nonce=cds.nonce)
            )
            await c.send(discovery_pb2.DiscoveryRequest(type_url=NAME_TABLE_TYPE_URL))
            await c.recv_type(NAME_TABLE_TYPE_URL)
            await asyncio.sleep(0.1)

            out = io.StringIO()
            assert await mesh_get("workloadentries", admin_url=mesh.admin_url, out=out) == 0
            lines = out.getvalue().splitlines()
            assert lines[0].split() == ["NAMESPACE", "NAME", "ADDRESS", "HEALTHY", "CONNECTED"]
            assert lines[1].split() == ["vm-ns", "vm-app-127.0.0.2", "127.0.0.2", "-", "yes"]

            out = io.StringIO()
            assert await mesh_get("workloadentries", output="yaml", state=mesh.settings.state_dir, out=out) == 0
            entries = yaml.safe_load(out.getvalue())
            assert entries[0]["metadata"]["annotations"]["istio.io/autoRegistrationGroup"] == "vm-app"

            out = io.StringIO()
            assert await mesh_get("proxies", output="json", admin_url=mesh.admin_url, out=out) == 0
            proxies = json.loads(out.getvalue())
            assert proxies[0]["types"][CDS]["acked"]["nonce"] == cds.nonce
            assert proxies[0]["identities"] == ["spiffe://cluster.local/ns/vm-ns/sa/vm-sa"]

            out = io.StringIO()
            assert await mesh_get("nametable", admin_url=mesh.admin_url, out=out) == 0
            assert "vm-app.vm-ns.svc.cluster.local" in out.getvalue()
            # DNS capture on: the address-less ServiceEntry has an auto-allocated VIP in 240.240/16.
            assert any("api.example.internal" in line and "240.240." in line for line in out.getvalue().splitlines())

            # apply -f: the change reaches the connected proxy within 1 s.
            manifest = tmp_path / "extra.yaml"
            manifest.write_text(EXTRA)
            out = io.StringIO()
            assert await mesh_apply(manifest, admin_url=mesh.admin_url, out=out) == 0
            assert out.getvalue() == "ServiceEntry vm-ns/payments applied\n"
            nds = await c.recv_type(NAME_TABLE_TYPE_URL, timeout=5.0)
            table = nds_pb2.NameTable()
            nds.resources[0].Unpack(table)
            assert "payments.example.internal" in table.table

            # An invalid manifest is refused with file/object/field, and nothing changes.
            bad = tmp_path / "bad.yaml"
            bad.write_text(BAD)
            assert await mesh_apply(bad, admin_url=mesh.admin_url) == 1
            async with (
                aiohttp.ClientSession() as s,
                s.post(f"{mesh.admin_url}/v1/apply?source=bad.yaml", data=BAD) as r,
            ):
                assert r.status == 422
                body = await r.json()
                assert any(
                    p.startswith("bad.yaml: Service vm-ns/broken: spec.ports[0].port:") for p in body["problems"]
                ), body
            assert mesh.store.get("Service", "vm-ns", "broken") is None

            out = io.StringIO()
            assert await mesh_delete(manifest, admin_url=mesh.admin_url, out=out) == 0
            assert out.getvalue() == "ServiceEntry vm-ns/payments deleted\n"
            nds = await c.recv_type(NAME_TABLE_TYPE_URL, timeout=5.0)
            nds.resources[0].Unpack(table)
            assert "payments.example.internal" not in table.table

        # No mesh there: a clear error, exit 1.
        assert await mesh_get("proxies", admin_url="http://127.0.0.1:9") == 1


async def test_manifests_folder_reload_and_refusal(tmp_path: Path) -> None:
    folder = tmp_path / "manifests"
    folder.mkdir()
    (folder / "base.yaml").write_text(VM_MANIFESTS)
    async with running_mesh(tmp_path, manifests_dir=folder, manifests_poll_s=0.05) as mesh:
        assert mesh.store.get("WorkloadGroup", "vm-ns", "vm-app") is not None
        token = mesh.mint_token("vm-ns", "vm-sa")
        async with ads(mesh.xds_address, mesh.root_cert_pem, token=token, delta=True) as c:
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, node=node(group=None)))
            cds = await c.recv_type(CDS)
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=cds.nonce))
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE_URL))
            nds = await c.recv_type(NAME_TABLE_TYPE_URL)
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE_URL, response_nonce=nds.nonce))
            (folder / "extra.yaml").write_text(EXTRA)
            nds = await c.recv_type(NAME_TABLE_TYPE_URL, timeout=5.0)
            table = nds_pb2.NameTable()
            nds.resources[0].resource.Unpack(table)
            assert "payments.example.internal" in table.table
            await c.send(discovery_pb2.DeltaDiscoveryRequest(type_url=NAME_TABLE_TYPE_URL, response_nonce=nds.nonce))

            # A broken file refuses the whole folder: the last good state stays, the error names the place.
            (folder / "extra.yaml").write_text(BAD)
            await asyncio.sleep(0.4)
            assert mesh.manifests is not None and mesh.manifests.last_error is not None
            assert f"{folder}/extra.yaml: Service vm-ns/broken: spec.ports[0].port" in mesh.manifests.last_error
            assert mesh.store.get("ServiceEntry", "vm-ns", "payments") is not None
            await c.expect_nothing(0.2)

            # Fixed by removing it: the ServiceEntry goes away, pushed as a new NameTable.
            (folder / "extra.yaml").unlink()
            nds = await c.recv_type(NAME_TABLE_TYPE_URL, timeout=5.0)
            nds.resources[0].resource.Unpack(table)
            assert "payments.example.internal" not in table.table
            assert mesh.manifests.last_error is None


async def test_vm_files_from_running_mesh(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, VM_MANIFESTS) as mesh:
        out = tmp_path / "vm-files"
        rc = await mesh_vm_files(
            state=mesh.settings.state_dir,
            group="vm-app",
            namespace="vm-ns",
            out=out,
            token_ttl="30m",
            internal_ip="127.0.0.2",
            autoregister=True,
        )
        assert rc == 0
        assert sorted(p.name for p in out.iterdir()) == [
            "cluster.env",
            "hosts",
            "istio-token",
            "mesh.yaml",
            "root-cert.pem",
        ]
        assert (out / "root-cert.pem").read_bytes() == mesh.root_cert_pem
        assert (out / "hosts").read_text() == "127.0.0.1 istiod.istio-system.svc\n"
        env = (out / "cluster.env").read_text()
        port = mesh.xds_address.rsplit(":", 1)[1]
        assert f"CA_ADDR='istiod.istio-system.svc:{port}'\n" in env
        assert "ISTIO_SVC_IP='127.0.0.2'\n" in env
        assert "ISTIO_META_AUTO_REGISTER_GROUP='vm-app'\n" in env
        mesh_yaml = yaml.safe_load((out / "mesh.yaml").read_text())
        assert mesh_yaml["defaultConfig"]["readinessProbe"]["httpGet"] == {"path": "/ready", "port": 8080}
        token = (out / "istio-token").read_text()
        subject = mesh.issuer.verify(token, ("istio-ca",))
        assert (subject.namespace, subject.service_account) == ("vm-ns", "vm-sa")
        assert 1790 <= subject.expires_at - time.time() <= 1800
        # The token works against the mesh CA.
        _, chain = await issue_cert(mesh.xds_address, (out / "root-cert.pem").read_bytes(), token)
        assert b"BEGIN CERTIFICATE" in chain
        # Unknown group: a clear error.
        assert (
            await mesh_vm_files(state=mesh.settings.state_dir, group="nope", namespace="vm-ns", out=tmp_path / "x") == 1
        )

        try:
            from vm_agent.config import Options, load
        except ImportError:  # the config loader is the lead's; without it the format tests above stand
            return
        cfg = load(
            Options(config_dir=out, environ={}, scan_interfaces=False, hostname="vm1", state_dir=tmp_path / "agent")
        )
        assert [str(p) for p in cfg.problems] == []
