"""A plain grpcio ADS client for driving the local mesh in tests (not the agent)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2

from vm_agent.mesh.ads import DELTA_PATH, SOTW_PATH
from vm_agent.proto import CA_CREATE_CERTIFICATE_PATH, ca_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

VM_MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: vm-ns}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: vm-sa, namespace: vm-ns}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: other-sa, namespace: vm-ns}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: vm-app, namespace: vm-ns, labels: {team: a}}
spec:
  metadata:
    labels: {app: vm-app}
    annotations: {owner: tests}
  template:
    serviceAccount: vm-sa
    ports: {http: 8080}
  probe:
    periodSeconds: 2
    httpGet: {path: /ready, port: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: vm-app, namespace: vm-ns}
spec:
  selector: {app: vm-app}
  ports: [{name: http, port: 8080, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext-api, namespace: vm-ns}
spec:
  hosts: [api.example.internal]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
"""


def node(
    ip: str = "127.0.0.2",
    namespace: str = "vm-ns",
    service_account: str = "vm-sa",
    *,
    group: str | None = "vm-app",
    probe: bool = True,
    dns_capture: bool = True,
    extra: dict[str, Any] | None = None,
    node_id: str | None = None,
) -> base_pb2.Node:
    meta: dict[str, Any] = {
        "NAMESPACE": namespace,
        "SERVICE_ACCOUNT": service_account,
        "CLUSTER_ID": "Kubernetes",
        "INSTANCE_IPS": ip,
        "LABELS": {"app": "vm-app", "version": "v1"},
        "ISTIO_VERSION": "1.28.0",
        "INTERCEPTION_MODE": "NONE",
    }
    if dns_capture:
        meta["DNS_CAPTURE"] = "true"
    if group:
        meta["AUTO_REGISTER_GROUP"] = group
    if probe:
        meta["PROXY_CONFIG"] = {"readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}}}
    meta.update(extra or {})
    s = struct_pb2.Struct()
    s.update(meta)
    return base_pb2.Node(
        id=node_id or f"sidecar~{ip}~vm1.{namespace}~{namespace}.svc.cluster.local",
        cluster=f"vm-app.{namespace}",
        metadata=s,
    )


def channel(address: str, root: bytes, client: tuple[bytes, bytes] | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(
        root, private_key=client[0] if client else None, certificate_chain=client[1] if client else None
    )
    return grpc.aio.secure_channel(
        address, creds, options=[("grpc.ssl_target_name_override", "istiod.istio-system.svc")]
    )


class AdsClient:
    """Reads in a background task: cancelling a grpc.aio read would cancel the whole call."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.call.read()
                await self._inbox.put(msg)
                if msg is grpc.aio.EOF:
                    return
        except grpc.aio.AioRpcError as e:
            await self._inbox.put(e)

    async def close(self) -> None:
        self.call.cancel()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    async def send(self, msg: Any) -> None:
        """Write; if the server already ended the stream, the failure shows in ``status()`` instead."""
        try:
            await self.call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            if not self.call.done():
                await asyncio.sleep(0.05)
            if not self.call.done():
                raise

    async def recv(self, timeout: float = 5.0) -> Any:
        msg = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(msg, grpc.aio.AioRpcError):
            raise msg
        if msg is grpc.aio.EOF:
            raise EOFError("stream ended")
        return msg

    async def recv_type(self, type_url: str, timeout: float = 5.0) -> Any:
        """Next response of ``type_url`` (responses of other types are skipped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            msg = await self.recv(max(deadline - loop.time(), 0.01))
            if msg.type_url == type_url:
                return msg

    async def expect_nothing(self, within: float = 0.4) -> None:
        try:
            msg = await asyncio.wait_for(self._inbox.get(), within)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected message {getattr(msg, 'type_url', msg)!r}")

    async def status(self, timeout: float = 5.0) -> grpc.StatusCode:
        """Read until the stream ends; its status code."""
        while True:
            msg = await asyncio.wait_for(self._inbox.get(), timeout)
            if isinstance(msg, grpc.aio.AioRpcError):
                return msg.code()
            if msg is grpc.aio.EOF:
                return await self.call.code()

    async def details(self) -> str:
        return await self.call.details()  # type: ignore[no-any-return]


@asynccontextmanager
async def ads(
    address: str,
    root: bytes,
    *,
    token: str | None = None,
    client: tuple[bytes, bytes] | None = None,
    delta: bool = False,
    cluster_id: str = "Kubernetes",
) -> AsyncIterator[AdsClient]:
    metadata: list[tuple[str, str]] = [("clusterid", cluster_id)]
    if token:
        metadata.append(("authorization", f"Bearer {token}"))
    async with channel(address, root, client) as ch:
        if delta:
            stub = ch.stream_stream(
                DELTA_PATH,
                request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
            )
        else:
            stub = ch.stream_stream(
                SOTW_PATH,
                request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
                response_deserializer=discovery_pb2.DiscoveryResponse.FromString,
            )
        client_ = AdsClient(stub(metadata=metadata))
        try:
            yield client_
        finally:
            await client_.close()


async def issue_cert(address: str, root: bytes, token: str, ttl: int = 3600) -> tuple[bytes, bytes]:
    """(key PEM, chain PEM) for the token's identity, from the mesh CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    async with channel(address, root) as ch:
        call = ch.unary_unary(
            CA_CREATE_CERTIFICATE_PATH,
            request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
        )
        resp = await call(
            ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, "".join(resp.cert_chain).encode()
