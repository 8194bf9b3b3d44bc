"""CreateCertificate on the local mesh's TLS port, driven by a plain grpcio client."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.helpers.mesh import running_mesh
from vm_agent.mesh.ca import MeshCA
from vm_agent.proto import CA_CREATE_CERTIFICATE_PATH, ca_pb2

pytestmark = pytest.mark.integration

MANIFESTS = """
apiVersion: v1
kind: Namespace
metadata: {name: vm-ns}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: vm-sa, namespace: vm-ns}
"""


def _csr(uri: str = "spiffe://attacker.example/ns/kube-system/sa/admin") -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode()


async def _call(
    address: str,
    root: bytes,
    *,
    token: str | None = None,
    cluster_id: str | None = None,
    client: tuple[bytes, bytes] | None = None,
    ttl: int = 0,
    plaintext: bool = False,
) -> tuple[bytes, list[str]]:
    key_pem, csr = _csr()
    if plaintext:
        channel = grpc.aio.insecure_channel(address)
    else:
        creds = grpc.ssl_channel_credentials(
            root, private_key=client[0] if client else None, certificate_chain=client[1] if client else None
        )
        channel = grpc.aio.secure_channel(
            address, creds, options=[("grpc.ssl_target_name_override", "istiod.istio-system.svc")]
        )
    metadata: list[tuple[str, str]] = []
    if token is not None:
        metadata.append(("authorization", f"Bearer {token}"))
    if cluster_id is not None:
        metadata.append(("clusterid", cluster_id))
    async with channel:
        call = channel.unary_unary(
            CA_CREATE_CERTIFICATE_PATH,
            request_serializer=ca_pb2.IstioCertificateRequest.SerializeToString,
            response_deserializer=ca_pb2.IstioCertificateResponse.FromString,
        )
        resp = await call(ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl), metadata=metadata, timeout=10)
    return key_pem, list(resp.cert_chain)


def _uris(pem: str) -> list[str]:
    cert = x509.load_pem_x509_certificate(pem.encode())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


async def test_token_accepted_identity_from_token_chain_leaf_first(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, MANIFESTS) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        _, chain = await _call(mesh.xds_address, mesh.root_cert_pem, token=token, cluster_id="Kubernetes")
        assert len(chain) == 2
        assert chain[-1].encode() == mesh.root_cert_pem
        assert _uris(chain[0]) == ["spiffe://cluster.local/ns/vm-ns/sa/vm-sa"]
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 86400
        # An empty clusterid is accepted like istiod (means "this cluster"), and a short TTL is honoured.
        _, chain = await _call(mesh.xds_address, mesh.root_cert_pem, token=token, cluster_id="", ttl=10)
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() == 10


async def test_rejections(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, MANIFESTS, max_cert_ttl_s=3600, plaintext_listen="127.0.0.1:0") as mesh:
        now = int(time.time())
        cases = {
            "no credentials": None,
            "wrong audience": mesh.mint_token("vm-ns", "vm-sa", audiences=("kubernetes.default.svc",)),
            "expired": mesh.issuer.mint("vm-ns", "vm-sa", ttl_seconds=60, now=now - 120),
            "not yet valid": mesh.mint_token("vm-ns", "vm-sa", not_before=now + 600),
            "unknown service account": mesh.mint_token("vm-ns", "ghost"),
            "unknown namespace default sa": mesh.mint_token("nowhere", "default"),
        }
        for what, token in cases.items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _call(mesh.xds_address, mesh.root_cert_pem, token=token)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, what
            assert info.value.details() == "request authenticate failure", what
        good = mesh.mint_token("vm-ns", "vm-sa")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(mesh.xds_address, mesh.root_cert_pem, token=good, cluster_id="other-cluster")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(mesh.xds_address, mesh.root_cert_pem, token=good, ttl=7200)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max allowed" in (info.value.details() or "")
        # The plaintext port never authenticates, so the CA refuses even a good token there.
        assert mesh.plaintext_address is not None
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(mesh.plaintext_address, mesh.root_cert_pem, token=good, plaintext=True)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_client_certificate_path(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, MANIFESTS) as mesh:
        token = mesh.mint_token("vm-ns", "vm-sa")
        key_pem, chain = await _call(mesh.xds_address, mesh.root_cert_pem, token=token)
        # The certificate the mesh issued authenticates on its own (no token), and the identity comes from it.
        _, chain2 = await _call(mesh.xds_address, mesh.root_cert_pem, client=(key_pem, "".join(chain).encode()))
        assert _uris(chain2[0]) == ["spiffe://cluster.local/ns/vm-ns/sa/vm-sa"]
        # A certificate from another CA fails the TLS handshake: rejected.
        stranger = MeshCA(tmp_path / "stranger-ca", "cluster.local")
        skey, schain = stranger.issue_key_and_chain(uris=("spiffe://cluster.local/ns/vm-ns/sa/vm-sa",))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _call(mesh.xds_address, mesh.root_cert_pem, client=(skey, schain))
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        # ... even when a valid token is sent along: the handshake never completes.
        with pytest.raises(grpc.aio.AioRpcError):
            await _call(mesh.xds_address, mesh.root_cert_pem, client=(skey, schain), token=token)


async def test_root_persists_across_restart(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, MANIFESTS) as mesh:
        root = mesh.root_cert_pem
        token = mesh.mint_token("vm-ns", "vm-sa")
    async with running_mesh(tmp_path, MANIFESTS) as mesh:
        assert mesh.root_cert_pem == root
        # The issuer key persisted too: a token minted before the restart still works.
        _, chain = await _call(mesh.xds_address, root, token=token)
        assert chain[-1].encode() == root
