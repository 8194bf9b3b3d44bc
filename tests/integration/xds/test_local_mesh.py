"""The proxy between a real Envoy and the built-in local mesh (istiod-like ADS, CA, auto-registration)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.mesh import MeshServer, running_mesh
from tests.helpers.net import free_port
from tests.integration.xds.conftest import running_proxy
from tests.integration.xds.envoy_run import running_envoy
from vm_agent.health.event import HealthEvent
from vm_agent.identity.manager import SecretManager
from vm_agent.identity.sds import SdsServer
from vm_agent.identity.settings import IdentitySettings
from vm_agent.proto import nds_pb2
from vm_agent.telemetry import NodeExchange, StockEnvoyAdapter
from vm_agent.upstream import UpstreamSettings
from vm_agent.xds import XdsSettings

pytestmark = pytest.mark.integration

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"


def manifests(port: int) -> str:
    return f"""
apiVersion: v1
kind: Namespace
metadata: {{name: vm-ns}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: vm-sa, namespace: vm-ns}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: vm-app, namespace: vm-ns}}
spec:
  metadata:
    labels: {{app: vm-app}}
  template:
    serviceAccount: vm-sa
    ports: {{http: {port}}}
  probe:
    httpGet: {{path: /ready, port: {port}}}
---
apiVersion: v1
kind: Service
metadata: {{name: vm-app, namespace: vm-ns}}
spec:
  selector: {{app: vm-app}}
  ports: [{{name: http, port: {port}, targetPort: {port}}}]
"""


def envoy_node(ip: str, port: int) -> dict[str, Any]:
    return {
        "id": f"sidecar~{ip}~vm1.vm-ns~vm-ns.svc.cluster.local",
        "cluster": "vm-app.vm-ns",
        "metadata": {
            "NAMESPACE": "vm-ns",
            "SERVICE_ACCOUNT": "vm-sa",
            "CLUSTER_ID": "Kubernetes",
            "INSTANCE_IPS": ip,
            "LABELS": {"app": "vm-app"},
            "ISTIO_VERSION": "1.28.0",
            "INTERCEPTION_MODE": "NONE",
            "DNS_CAPTURE": "true",
            "AUTO_REGISTER_GROUP": "vm-app",
            "PROXY_CONFIG": {"readinessProbe": {"httpGet": {"path": "/ready", "port": port}}},
        },
    }


@contextlib.asynccontextmanager
async def running_identity(settings: IdentitySettings) -> AsyncIterator[SecretManager]:
    manager = SecretManager(settings)
    sds = SdsServer(settings, manager)
    tasks = [asyncio.create_task(manager.run()), asyncio.create_task(sds.run())]
    try:
        await asyncio.wait_for(manager.ready.wait(), 20)
        yield manager
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


def condition(mesh: MeshServer, name: str) -> dict[str, Any] | None:
    for entry in mesh.workload_entries():
        if entry["metadata"]["name"] == name:
            conditions = (entry.get("status") or {}).get("conditions") or [{}]
            return dict(conditions[0])
    return None


async def until(check: Any, what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_envoy_through_proxy_to_local_mesh(tmp_path: Path) -> None:
    port = free_port()
    # An address of our own inside 127/8 for the inbound listener, so parallel tests do not collide.
    ip = f"127.0.{random.randint(2, 250)}.{random.randint(2, 250)}"
    tables: list[nds_pb2.NameTable] = []

    async def on_name_table(table: nds_pb2.NameTable) -> None:
        tables.append(table)

    async with running_mesh(tmp_path, manifests(port)) as mesh:
        root = tmp_path / "root-cert.pem"
        root.write_bytes(mesh.root_cert_pem)
        token = tmp_path / "istio-token"
        token.write_text(mesh.mint_token("vm-ns", "vm-sa"))
        upstream = UpstreamSettings(
            address="istiod.istio-system.svc:15012",
            dial_target=mesh.xds_address,
            server_name="istiod.istio-system.svc",
            root_cert_path=root,
            token_path=token,
            cluster_id="Kubernetes",
        )
        identity = IdentitySettings(
            ca=upstream,
            trust_domain="cluster.local",
            namespace="vm-ns",
            service_account="vm-sa",
            state_dir=tmp_path / "state",
            sds_socket=tmp_path / "sds" / "socket",
            key_algorithm="ECDSA",
        )
        settings = XdsSettings(socket_path=tmp_path / "proxy" / "XDS", upstream=upstream, dns_enabled=True)
        async with (
            running_identity(identity) as manager,
            running_proxy(
                settings,
                client_cert=manager.client_cert,
                on_name_table=on_name_table,
                # As the agent does: the local mesh pushes istiod's telemetry filters, fitted here to stock Envoy.
                rewrite_response=StockEnvoyAdapter(
                    NodeExchange(envoy_node(ip, port)["id"], "Cg0KBE5BTUUSBRoDdm0x"), True
                ),
            ) as proxy,
            running_envoy(
                tmp_path, settings.socket_path, "DELTA_GRPC", node=envoy_node(ip, port), sds_socket=identity.sds_socket
            ) as envoy,
        ):
            service_cluster = f"outbound|{port}||vm-app.vm-ns.svc.cluster.local"

            async def configured() -> bool:
                clusters, listeners = await envoy.names()
                return service_cluster in clusters and f"{ip}_{port}" in listeners

            deadline = asyncio.get_running_loop().time() + 30
            while not await configured():
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"Envoy never got the mesh config: {await envoy.names()}\n{envoy.log()[-3000:]}")
                await asyncio.sleep(0.1)
            types = proxy.snapshot()["types"]
            assert types[CDS]["nacks"] == 0 and types[CDS]["acks"] >= 1
            assert types[LDS]["nacks"] == 0 and types[LDS]["acks"] >= 1

            await until(lambda: tables, "the NameTable")
            assert "vm-app.vm-ns.svc.cluster.local" in tables[-1].table
            assert "NameTable" not in envoy.log()

            # Auto-registration happened on the proxied stream; health reports drive its condition.
            entry = f"vm-app-{ip}"
            await until(lambda: condition(mesh, entry) is not None, "the WorkloadEntry")
            proxy.report_health(HealthEvent(True))
            await until(lambda: (condition(mesh, entry) or {}).get("status") == "True", "Healthy=True")
            proxy.report_health(HealthEvent(False, "HTTP probe: 503"))
            await until(lambda: (condition(mesh, entry) or {}).get("status") == "False", "Healthy=False")
            assert (condition(mesh, entry) or {}).get("message") == "HTTP probe: 503"
