"""Acceptance against the built-in local mesh (istiod-like CA with real TLS and signed service-account JWTs)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

import pytest

from tests.helpers.mesh import MeshServer, running_mesh
from tests.integration.identity.envoy_sds import RunningEnvoy, envoy_with_sds, mtls_call
from tests.integration.identity.envoy_sds import spiffe_uris as peer_spiffe_uris
from tests.integration.identity.test_sds_protocol import running_sds
from tests.unit.identity.conftest import fast_backoff, running
from tests.unit.identity.pki import ThrowawayCA
from vm_agent.identity.manager import SecretManager
from vm_agent.identity.settings import IdentitySettings
from vm_agent.identity.svid import spiffe_uris
from vm_agent.upstream import UpstreamSettings

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
SPIFFE = "spiffe://cluster.local/ns/vm-ns/sa/vm-sa"


def settings_for(mesh: MeshServer, tmp_path: Path, **kw: object) -> IdentitySettings:
    root = tmp_path / "root-cert.pem"
    if not root.exists():
        root.write_bytes(mesh.root_cert_pem)
    ca = UpstreamSettings(
        address="istiod.istio-system.svc:15012",
        dial_target=mesh.xds_address,
        server_name="istiod.istio-system.svc",
        root_cert_path=root,
        token_path=tmp_path / "istio-token",
        cluster_id="Kubernetes",
    )
    values: dict[str, object] = {
        "ca": ca,
        "trust_domain": "cluster.local",
        "namespace": "vm-ns",
        "service_account": "vm-sa",
        "state_dir": tmp_path / "state",
        "sds_socket": tmp_path / "run" / "workload-spiffe-uds" / "socket",
        "output_certs": tmp_path / "etc-certs",
    }
    values.update(kw)
    return IdentitySettings(**values)  # type: ignore[arg-type]


def _peer(mesh: MeshServer) -> tuple[bytes, bytes]:
    """A client holding a certificate from the mesh CA (another workload)."""
    key, chain = mesh.ca.issue_key_and_chain(uris=("spiffe://cluster.local/ns/other/sa/client",), ttl_s=600)
    return key, chain


async def _wait_mtls(envoy: RunningEnvoy, root: bytes, client: tuple[bytes, bytes]) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        result = await asyncio.to_thread(mtls_call, envoy.listener_port, root, client)
        if result.ok:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"Envoy never served mTLS: {result.error}\n{envoy.log()[-2000:]}")
        await asyncio.sleep(0.2)


async def test_ten_second_certificates_rotate_under_envoy_and_survive_token_loss(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, MANIFESTS) as mesh:
        (tmp_path / "istio-token").write_text(mesh.mint_token("vm-ns", "vm-sa"))
        settings = settings_for(mesh, tmp_path, requested_ttl_seconds=10, grace_ratio=0.6, key_algorithm="ECDSA")
        manager = SecretManager(settings, backoff=fast_backoff())
        client = _peer(mesh)
        serials: set[int] = set()
        async with (
            running(manager),
            running_sds(settings, manager),
            envoy_with_sds(settings.sds_socket, tmp_path) as envoy,
        ):
            await asyncio.wait_for(manager.ready.wait(), 20)
            svid = manager.svid
            assert svid is not None
            assert spiffe_uris(svid.leaf) == [SPIFFE]
            assert (svid.not_after - svid.not_before).total_seconds() <= 11
            await _wait_mtls(envoy, mesh.root_cert_pem, client)
            (tmp_path / "istio-token").unlink()  # from here on only the SVID itself authenticates
            end = asyncio.get_running_loop().time() + 13
            while asyncio.get_running_loop().time() < end:
                result = await asyncio.to_thread(mtls_call, envoy.listener_port, mesh.root_cert_pem, client)
                assert result.ok, result.error  # Python checks the chain and expiry at every handshake
                assert result.server_cert is not None
                assert peer_spiffe_uris(result.server_cert) == [SPIFFE]
                serials.add(result.server_cert.serial_number)
                await asyncio.sleep(0.2)
            snap = manager.snapshot()
        assert snap["rotations"] >= 3, snap
        assert snap["failures"] == 0, snap
        assert len(serials) >= 3


async def test_restart_serves_sds_before_the_ca_is_reachable(tmp_path: Path) -> None:
    async with running_mesh(tmp_path, MANIFESTS) as mesh:
        (tmp_path / "istio-token").write_text(mesh.mint_token("vm-ns", "vm-sa"))
        settings = settings_for(mesh, tmp_path)
        first = SecretManager(settings)
        async with running(first):
            await asyncio.wait_for(first.ready.wait(), 20)
        client = _peer(mesh)
        root = mesh.root_cert_pem
    # The mesh is gone: the restarted agent has only its state folder.
    second = SecretManager(settings, backoff=fast_backoff())
    async with (
        running(second),
        running_sds(settings, second),
        envoy_with_sds(settings.sds_socket, tmp_path) as envoy,
    ):
        await asyncio.wait_for(second.ready.wait(), 2)
        await _wait_mtls(envoy, root, client)
        certs = envoy.certs()["certificates"]
        uris = [s["uri"] for c in certs for cc in c.get("cert_chain", []) for s in cc.get("subject_alt_names", [])]
        assert SPIFFE in uris
        assert second.snapshot()["source"] == "persisted"


@pytest.mark.parametrize(
    ("case", "reason", "words"),
    [
        ("expired", "token_expired", "expired at"),
        ("audience", "token_audience", "audience kubernetes.default.svc, not istio-ca"),
        ("other-root", "tls_untrusted", "is not signed by"),
    ],
)
async def test_errors_against_the_mesh_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str, reason: str, words: str
) -> None:
    async with running_mesh(tmp_path, MANIFESTS) as mesh:
        if case == "expired":
            token = mesh.mint_token("vm-ns", "vm-sa", ttl_seconds=-120)
        elif case == "audience":
            token = mesh.mint_token("vm-ns", "vm-sa", audiences=("kubernetes.default.svc",))
        else:
            token = mesh.mint_token("vm-ns", "vm-sa")
            (tmp_path / "root-cert.pem").write_bytes(ThrowawayCA.create("some other mesh").pem)
        (tmp_path / "istio-token").write_text(token)
        manager = SecretManager(settings_for(mesh, tmp_path), backoff=fast_backoff())
        with caplog.at_level(logging.DEBUG, logger="vm_agent"):
            async with running(manager) as task:
                deadline = asyncio.get_running_loop().time() + 20
                while manager.snapshot()["failures"] < 2:
                    assert asyncio.get_running_loop().time() < deadline, manager.snapshot()
                    await asyncio.sleep(0.05)
                assert not task.done()
                assert manager.snapshot()["last_error_reason"] == reason
        lines = [r.getMessage() for r in caplog.records]
        assert any(words in line for line in lines if line.startswith("certificate request failed")), lines
        assert not any(token in line or token.split(".")[1] in line for line in lines)


async def test_plaintext_ca_address_dials_without_tls(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.helpers.net import free_port

    async with running_mesh(tmp_path, MANIFESTS, plaintext_listen=f"127.0.0.1:{free_port()}") as mesh:
        assert mesh.plaintext_address is not None
        (tmp_path / "istio-token").write_text(mesh.mint_token("vm-ns", "vm-sa"))
        settings = settings_for(mesh, tmp_path)
        plain = dataclasses.replace(
            settings, ca=dataclasses.replace(settings.ca, dial_target=mesh.plaintext_address, plaintext=True)
        )
        manager = SecretManager(plain, backoff=fast_backoff())
        async with running(manager):
            deadline = asyncio.get_running_loop().time() + 20
            while manager.snapshot()["failures"] < 1:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        # Like istiod, the mesh never signs over plaintext; reaching that answer proves the non-TLS dial worked.
        assert manager.snapshot()["last_error_reason"] == "unauthenticated"
