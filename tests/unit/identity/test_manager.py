"""SecretManager against a real TLS CA on 127.0.0.1: issue, persist, restart, rotate, and every error case."""

from __future__ import annotations

import asyncio
import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.helpers.net import free_port
from tests.unit.identity.ca_server import LocalCAServer
from tests.unit.identity.conftest import fast_backoff, identity_settings, make_token, running
from tests.unit.identity.pki import ThrowawayCA
from vm_agent.identity.der import spki_public_key
from vm_agent.identity.manager import SecretManager


async def _until(check: object, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _assert_no_secrets(caplog: pytest.LogCaptureFixture, *secrets: bytes | str) -> None:
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    for secret in secrets:
        s = secret.decode() if isinstance(secret, bytes) else secret
        body = s.strip().splitlines()[1] if s.startswith("-----BEGIN") else s
        assert body not in text


async def test_issue_persist_and_output_certs(
    tmp_path: Path, ca_server: LocalCAServer, identity_logs: pytest.LogCaptureFixture
) -> None:
    token = make_token()
    (tmp_path / "istio-token").write_text(token + "\n")
    settings = identity_settings(tmp_path, ca_server)
    manager = SecretManager(settings)
    async with running(manager):
        await asyncio.wait_for(manager.ready.wait(), 15)
    svid = manager.svid
    assert svid is not None
    assert svid.spiffe_id == "spiffe://cluster.local/ns/ns1/sa/sa1"
    call = ca_server.calls[0]
    assert call.metadata["authorization"] == f"Bearer {token}"
    assert call.metadata["clusterid"] == "Kubernetes"
    assert call.validity_duration == 3600
    assert call.cert_signer == "signer-x"
    csr = x509.load_pem_x509_csr(call.csr.encode())
    spki = csr.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    assert svid.leaf.public_key == spki_public_key(spki)

    for folder, key_mode in ((settings.state_dir, 0o600), (settings.output_certs, 0o600)):
        assert folder is not None
        for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
            assert stat.S_IMODE((folder / name).stat().st_mode) == key_mode
        assert (folder / "key.pem").read_bytes() == svid.key_pem
        assert (folder / "cert-chain.pem").read_bytes() == svid.chain_pem
        assert (folder / "root-cert.pem").read_bytes() == ca_server.ca.pem
    assert manager.client_cert() == (svid.key_pem, svid.chain_pem)
    snap = manager.snapshot()
    assert snap["spiffe_id"] == svid.spiffe_id
    assert snap["rotations"] == 1
    assert snap["trust_bundle_roots"] == 1
    _assert_no_secrets(identity_logs, token, svid.key_pem)


async def test_restart_serves_persisted_certificate_before_ca(tmp_path: Path, ca_server: LocalCAServer) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    first = SecretManager(settings)
    async with running(first):
        await asyncio.wait_for(first.ready.wait(), 15)
    assert first.svid is not None
    await ca_server.stop()

    second = SecretManager(settings, backoff=fast_backoff())
    async with running(second):
        await asyncio.wait_for(second.ready.wait(), 2)
        assert second.svid is not None
        assert second.svid.chain_pem == first.svid.chain_pem
        assert second.snapshot()["source"] == "persisted"
        assert second.client_cert() is not None


async def test_expired_persisted_certificate_is_not_used(tmp_path: Path, ca_server: LocalCAServer) -> None:
    ca_server.cert_ttl = dt.timedelta(seconds=1)
    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    first = SecretManager(settings)
    async with running(first):
        await asyncio.wait_for(first.ready.wait(), 15)
    await asyncio.sleep(1.2)
    calls = len(ca_server.calls)
    second = SecretManager(settings)
    async with running(second):
        await asyncio.wait_for(second.ready.wait(), 15)
        assert second.snapshot()["source"] == "ca"
    assert len(ca_server.calls) > calls


async def test_rotates_and_renews_with_certificate_after_token_deleted(
    tmp_path: Path, ca_server: LocalCAServer
) -> None:
    ca_server.cert_ttl = dt.timedelta(seconds=3)
    (tmp_path / "istio-token").write_text(make_token())
    manager = SecretManager(identity_settings(tmp_path, ca_server), backoff=fast_backoff())
    seen: list[frozenset[str]] = []
    manager.subscribe(seen.append)
    async with running(manager):
        await asyncio.wait_for(manager.ready.wait(), 15)
        first = manager.svid
        assert first is not None
        (tmp_path / "istio-token").unlink()
        await _until(lambda: manager.snapshot()["rotations"] >= 3, what="3 rotations")
        latest = manager.svid
        assert latest is not None
        assert latest.key_pem != first.key_pem  # a fresh key every rotation
        assert manager.snapshot()["failures"] == 0
    assert ca_server.calls[0].client_uri is None
    renewals = ca_server.calls[1:]
    assert renewals
    assert all(c.client_uri == "spiffe://cluster.local/ns/ns1/sa/sa1" for c in renewals)
    assert all("authorization" not in c.metadata for c in renewals)
    assert seen[0] == frozenset({"default", "ROOTCA"})
    assert frozenset({"default"}) in seen[1:]


async def test_request_rotation_is_serialised(tmp_path: Path, ca_server: LocalCAServer) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    manager = SecretManager(identity_settings(tmp_path, ca_server))
    async with running(manager):
        await asyncio.wait_for(manager.ready.wait(), 15)
        for _ in range(5):
            manager.request_rotation()
        await _until(lambda: manager.snapshot()["rotations"] >= 2, what="requested rotation")
        await asyncio.sleep(0.3)
    assert manager.snapshot()["rotations"] == len(ca_server.calls)
    assert len(ca_server.calls) <= 3


async def _expect_failure(
    manager: SecretManager, reason: str, caplog: pytest.LogCaptureFixture, words: str, timeout: float = 20.0
) -> None:
    async with running(manager) as task:
        await _until(lambda: manager.snapshot()["failures"] >= 2, timeout, what=f"two {reason} failures")
        assert not task.done()
        snap = manager.snapshot()
        assert snap["last_error_reason"] == reason
        assert not manager.ready.is_set()
    messages = [r.getMessage() for r in caplog.records if r.name == "vm_agent.identity" and r.levelname == "WARNING"]
    assert any(words in m for m in messages), messages


async def test_expired_token_is_named(
    tmp_path: Path, ca_server: LocalCAServer, identity_logs: pytest.LogCaptureFixture
) -> None:
    token = make_token(ttl=-60)
    (tmp_path / "istio-token").write_text(token)
    manager = SecretManager(identity_settings(tmp_path, ca_server), backoff=fast_backoff())
    await _expect_failure(manager, "token_expired", identity_logs, "expired at")
    _assert_no_secrets(identity_logs, token)


async def test_wrong_audience_is_named(
    tmp_path: Path, ca_server: LocalCAServer, identity_logs: pytest.LogCaptureFixture
) -> None:
    token = make_token(aud=["https://kubernetes.default.svc"])
    (tmp_path / "istio-token").write_text(token)
    manager = SecretManager(identity_settings(tmp_path, ca_server), backoff=fast_backoff())
    await _expect_failure(
        manager, "token_audience", identity_logs, "audience https://kubernetes.default.svc, not istio-ca"
    )
    _assert_no_secrets(identity_logs, token)


async def test_unreachable_ca_is_named(
    tmp_path: Path, ca_server: LocalCAServer, identity_logs: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    port = free_port()
    settings = identity_settings(tmp_path, ca_server, dial_target=f"127.0.0.1:{port}")
    manager = SecretManager(settings, backoff=fast_backoff())
    await _expect_failure(
        manager, "ca_unreachable", identity_logs, f"CA unreachable at istiod.istio-system.svc:15012 (127.0.0.1:{port})"
    )


async def test_root_cert_from_another_mesh_is_named(
    tmp_path: Path, ca_server: LocalCAServer, identity_logs: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    (tmp_path / "root-cert.pem").write_bytes(ThrowawayCA.create("another mesh").pem)
    manager = SecretManager(identity_settings(tmp_path, ca_server), backoff=fast_backoff())
    await _expect_failure(manager, "tls_untrusted", identity_logs, f"not signed by {tmp_path / 'root-cert.pem'}")


async def test_empty_chain_is_named(
    tmp_path: Path, ca_server: LocalCAServer, identity_logs: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    ca_server.empty_chain = True
    manager = SecretManager(identity_settings(tmp_path, ca_server), backoff=fast_backoff())
    await _expect_failure(manager, "empty_chain", identity_logs, "CA returned an empty certificate chain")


async def test_new_token_is_picked_up_without_restart(
    tmp_path: Path, ca_server: LocalCAServer, identity_logs: pytest.LogCaptureFixture
) -> None:
    # A slow backoff: only the file watch can explain a quick recovery.
    from vm_agent.backoff import FullJitterBackoff

    manager = SecretManager(identity_settings(tmp_path, ca_server), backoff=FullJitterBackoff(30, 60, floor=30))
    async with running(manager) as task:
        await _until(lambda: manager.snapshot()["failures"] >= 1, what="first failure")
        assert manager.snapshot()["last_error_reason"] == "no_credentials"
        assert not task.done()
        (tmp_path / "istio-token").write_text(make_token())
        await asyncio.wait_for(manager.ready.wait(), 5)
    assert any("no token in" in r.getMessage() for r in identity_logs.records)


async def test_trust_bundle_change_pushes_rootca_and_is_persisted(tmp_path: Path, ca_server: LocalCAServer) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    manager = SecretManager(settings)
    seen: list[frozenset[str]] = []
    manager.subscribe(seen.append)
    async with running(manager):
        assert await manager.check_ready() is not None
        await asyncio.wait_for(manager.ready.wait(), 15)
        assert await manager.check_ready() is None
        assert manager.trust_bundle() == ca_server.ca.pem
        extra = ThrowawayCA.create("next root").pem
        # An operator adds the next root to root-cert.pem ahead of a root rotation.
        settings.ca.root_cert_path.write_bytes(ca_server.ca.pem + extra)
        manager.request_rotation()
        await _until(lambda: len(seen) >= 2, what="second update")
        assert seen[1] == frozenset({"default", "ROOTCA"})
        bundle = manager.trust_bundle()
        assert bundle == b"".join(sorted([ca_server.ca.pem, extra]))
        manager.request_rotation()
        await _until(lambda: len(seen) >= 3, what="third update")
        assert seen[2] == frozenset({"default"})  # unchanged bundle: only the certificate is pushed
    assert (settings.state_dir / "root-cert.pem").read_bytes() == bundle
    assert settings.output_certs is not None
    assert (settings.output_certs / "root-cert.pem").read_bytes() == bundle


async def test_ca_retries_back_off_with_full_jitter_also_on_resource_exhausted(
    tmp_path: Path, ca_server: LocalCAServer
) -> None:
    import itertools
    import random

    from grpclib.const import Status

    from vm_agent.identity.ca_client import CaClient
    from vm_agent.identity.csr import generate_key_and_csr

    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    ca_server.fail_with = [Status.RESOURCE_EXHAUSTED, Status.UNAVAILABLE, Status.RESOURCE_EXHAUSTED]
    client = CaClient(settings.ca, None, attempts=5, first_wait=0.2, rng=random.Random(4))
    _, csr = generate_key_and_csr("spiffe://cluster.local/ns/ns1/sa/sa1")
    chain = await client.create_certificate(csr, 3600)
    assert chain
    gaps = [b - a for a, b in itertools.pairwise(ca_server.attempt_times)]
    assert len(gaps) == 3
    # The n-th wait is drawn from [first_wait / 2, first_wait * 2**(n-1)]: never a tight loop, never in step.
    for n, gap in enumerate(gaps, start=1):
        assert 0.1 <= gap <= 0.2 * 2 ** (n - 1) + 0.5, (n, gap)  # the margin: TLS set-up on a busy machine
