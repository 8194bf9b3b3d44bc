"""A real Envoy 1.40 consuming `default` and `ROOTCA` from our SDS socket for an inbound mTLS listener."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.identity.envoy_sds import GREETING, RunningEnvoy, envoy_with_sds, mtls_call, spiffe_uris
from tests.integration.identity.test_sds_protocol import running_sds
from tests.unit.identity.ca_server import LocalCAServer
from tests.unit.identity.conftest import identity_settings, make_token, running
from tests.unit.identity.pki import ThrowawayCA
from vm_agent.identity.manager import SecretManager

pytestmark = pytest.mark.integration

SPIFFE = "spiffe://cluster.local/ns/ns1/sa/sa1"


@pytest.fixture
async def ca_server() -> AsyncIterator[LocalCAServer]:
    async with LocalCAServer() as server:
        yield server


def _cert_spiffe_ids(envoy: RunningEnvoy) -> list[str]:
    ids = []
    for entry in envoy.certs().get("certificates", []):
        for cert in entry.get("cert_chain", []):
            for san in cert.get("subject_alt_names", []):
                if "uri" in san:
                    ids.append(san["uri"])
    return ids


async def _wait_listener(envoy: RunningEnvoy, root: bytes, client: tuple[bytes, bytes]) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        result = await asyncio.to_thread(mtls_call, envoy.listener_port, root, client)
        if result.ok:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"Envoy listener never served mTLS: {result.error}\n{envoy.log()[-3000:]}")
        await asyncio.sleep(0.2)


async def test_envoy_serves_spiffe_cert_and_enforces_mtls(tmp_path: Path, ca_server: LocalCAServer) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    manager = SecretManager(settings)
    peer_key, peer_leaf = ca_server.ca.issue_workload("spiffe://cluster.local/ns/other/sa/client")
    mesh_client = (peer_key, peer_leaf + ca_server.ca.pem)
    stranger_ca = ThrowawayCA.create("not our mesh")
    s_key, s_leaf = stranger_ca.issue_workload("spiffe://evil.example/ns/x/sa/y")
    async with (
        running(manager),
        running_sds(settings, manager),
        envoy_with_sds(settings.sds_socket, tmp_path) as envoy,
    ):
        await _wait_listener(envoy, ca_server.ca.pem, mesh_client)
        assert SPIFFE in _cert_spiffe_ids(envoy)

        ok = await asyncio.to_thread(mtls_call, envoy.listener_port, ca_server.ca.pem, mesh_client)
        assert ok.ok
        assert ok.server_cert is not None
        assert spiffe_uris(ok.server_cert) == [SPIFFE]

        no_cert = await asyncio.to_thread(mtls_call, envoy.listener_port, ca_server.ca.pem, None)
        assert not no_cert.ok
        assert GREETING not in no_cert.data
        # Envoy refuses during the handshake: an alert (CERTIFICATE_REQUIRED) or, under load, a bare close.
        assert no_cert.error is not None
        foreign = await asyncio.to_thread(
            mtls_call, envoy.listener_port, ca_server.ca.pem, (s_key, s_leaf + stranger_ca.pem)
        )
        assert not foreign.ok
        assert GREETING not in foreign.data


async def test_envoy_always_serves_a_valid_cert_across_rotations(tmp_path: Path, ca_server: LocalCAServer) -> None:
    ca_server.cert_ttl = dt.timedelta(seconds=4)
    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    manager = SecretManager(settings)
    peer_key, peer_leaf = ca_server.ca.issue_workload("spiffe://cluster.local/ns/other/sa/client")
    client = (peer_key, peer_leaf + ca_server.ca.pem)
    serials: set[int] = set()
    async with (
        running(manager),
        running_sds(settings, manager),
        envoy_with_sds(settings.sds_socket, tmp_path) as envoy,
    ):
        await _wait_listener(envoy, ca_server.ca.pem, client)
        (tmp_path / "istio-token").unlink()  # renewals must work on the certificate alone
        end = asyncio.get_running_loop().time() + 9
        handshakes = 0
        while asyncio.get_running_loop().time() < end:
            result = await asyncio.to_thread(mtls_call, envoy.listener_port, ca_server.ca.pem, client)
            # Python verified the chain (including expiry) during the handshake; a stale cert would fail here.
            assert result.ok, result.error
            assert result.server_cert is not None
            serials.add(result.server_cert.serial_number)
            handshakes += 1
            await asyncio.sleep(0.1)
        assert manager.snapshot()["rotations"] >= 3
    assert len(serials) >= 3, f"{handshakes} handshakes saw only {len(serials)} certificates"
    assert all(c.client_uri == SPIFFE for c in ca_server.calls[1:])


async def test_restarted_agent_serves_sds_before_ca_is_reachable(tmp_path: Path, ca_server: LocalCAServer) -> None:
    (tmp_path / "istio-token").write_text(make_token())
    settings = identity_settings(tmp_path, ca_server)
    first = SecretManager(settings)
    async with running(first):
        await asyncio.wait_for(first.ready.wait(), 15)
    await ca_server.stop()  # the CA is gone for the restart
    peer_key, peer_leaf = ca_server.ca.issue_workload("spiffe://cluster.local/ns/other/sa/client")
    second = SecretManager(settings)
    async with (
        running(second),
        running_sds(settings, second),
        envoy_with_sds(settings.sds_socket, tmp_path) as envoy,
    ):
        await _wait_listener(envoy, ca_server.ca.pem, (peer_key, peer_leaf + ca_server.ca.pem))
        assert SPIFFE in _cert_spiffe_ids(envoy)
        assert second.snapshot()["source"] == "persisted"
