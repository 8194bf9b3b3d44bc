"""Shared pieces for identity tests: a running local CA and settings pointing at it."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

import pytest

from tests.unit.identity.ca_server import LocalCAServer
from tests.unit.identity.pki import make_jwt
from vm_agent.backoff import FullJitterBackoff
from vm_agent.identity.manager import SecretManager
from vm_agent.identity.settings import IdentitySettings
from vm_agent.upstream import UpstreamSettings


def make_token(sub: str = "system:serviceaccount:ns1:sa1", aud: object = "istio-ca", ttl: int = 3600) -> str:
    now = int(dt.datetime.now(dt.UTC).timestamp())
    return make_jwt({"sub": sub, "aud": aud, "iat": now - 10, "exp": now + ttl})


def identity_settings(tmp_path: Path, server: LocalCAServer, **ca: object) -> IdentitySettings:
    root = tmp_path / "root-cert.pem"
    if not root.exists():
        root.write_bytes(server.ca.pem)
    upstream: dict[str, object] = {
        "address": "istiod.istio-system.svc:15012",
        "dial_target": server.address,
        "server_name": "istiod.istio-system.svc",
        "root_cert_path": root,
        "token_path": tmp_path / "istio-token",
        "cluster_id": "Kubernetes",
    }
    upstream.update(ca)
    return IdentitySettings(
        ca=UpstreamSettings(**upstream),  # type: ignore[arg-type]
        trust_domain="cluster.local",
        namespace="ns1",
        service_account="sa1",
        state_dir=tmp_path / "state",
        sds_socket=tmp_path / "run" / "workload-spiffe-uds" / "socket",
        key_algorithm="ECDSA",
        requested_ttl_seconds=3600,
        cert_signer="signer-x",
        output_certs=tmp_path / "etc-certs",
    )


def fast_backoff() -> FullJitterBackoff:
    return FullJitterBackoff(0.05, 0.3, floor=0.01)


@asynccontextmanager
async def running(manager: SecretManager) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(manager.run())
    try:
        yield task
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def ca_server() -> AsyncIterator[LocalCAServer]:
    async with LocalCAServer() as server:
        yield server


@pytest.fixture
def identity_logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    with caplog.at_level(logging.DEBUG, logger="vm_agent"):
        yield caplog
