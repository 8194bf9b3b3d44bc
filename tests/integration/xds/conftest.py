"""Fixtures for the xDS proxy tests: throwaway PKI, a TLS ADS server, and a running Proxy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.net import free_port
from tests.integration.xds.ads_server import AdsServer
from tests.integration.xds.pki import ISTIOD_NAME, XdsPki
from vm_agent.upstream import ClientCertProvider, UpstreamSettings
from vm_agent.xds import NameTableHandler, Proxy, XdsSettings
from vm_agent.xds.proxy import ResponseRewriter

TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"


@pytest.fixture
def pki(tmp_path: Path) -> XdsPki:
    return XdsPki.create(tmp_path / "pki")


@pytest.fixture
async def ads(pki: XdsPki) -> AsyncIterator[AdsServer]:
    """Token mode: the server asks for no client certificate (like istiod with a JWT)."""
    server = AdsServer(pki.server_key_pem, pki.server_cert_pem, None, free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def upstream_settings(tmp_path: Path, pki: XdsPki, server: AdsServer, *, token: bool = True) -> UpstreamSettings:
    token_path = None
    if token:
        token_path = tmp_path / "istio-token"
        token_path.write_text(TOKEN + "\n")
    return UpstreamSettings(
        address=f"{ISTIOD_NAME}:{server.port}",
        dial_target=server.address,
        server_name=ISTIOD_NAME,
        root_cert_path=pki.root_path,
        token_path=token_path,
        cluster_id="Kubernetes",
        extra_metadata=(("X-Test-Header", "yes"),),
    )


@contextlib.asynccontextmanager
async def running_proxy(
    settings: XdsSettings,
    *,
    client_cert: ClientCertProvider | None = None,
    on_name_table: NameTableHandler | None = None,
    rewrite_response: ResponseRewriter | None = None,
) -> AsyncIterator[Proxy]:
    proxy = Proxy(settings, client_cert=client_cert, on_name_table=on_name_table, rewrite_response=rewrite_response)
    task = asyncio.create_task(proxy.run())
    try:
        await asyncio.wait_for(proxy.ready.wait(), 10)
        yield proxy
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
