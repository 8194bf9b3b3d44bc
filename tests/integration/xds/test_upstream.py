"""Upstream failures and credentials: what istiod sees, and what Envoy keeps when istiod goes away."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography import x509

from tests.helpers.net import free_port
from tests.integration.xds.ads_server import CDS, LDS, AdsServer
from tests.integration.xds.conftest import running_proxy, upstream_settings
from tests.integration.xds.envoy_run import running_envoy
from tests.integration.xds.pki import SPIFFE_ID, XdsPki
from tests.integration.xds.test_proxy_envoy import cluster, listener
from vm_agent.xds import XdsSettings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
async def test_upstream_restart_ends_stream_envoy_keeps_config_then_gets_changes(
    tmp_path: Path, pki: XdsPki, api_type: str
) -> None:
    port = free_port()
    ads = AdsServer(pki.server_key_pem, pki.server_cert_pem, None, port)
    ads.set_resources(CDS, [("c1", cluster("c1"))])
    ads.set_resources(LDS, [("l1", listener("l1", "c1"))])
    await ads.start()
    settings = XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads), dns_enabled=False
    )
    try:
        async with running_proxy(settings) as proxy, running_envoy(tmp_path, settings.socket_path, api_type) as envoy:
            await envoy.wait_names({"c1"}, {"l1"})
            assert proxy.snapshot()["upstream"]["state"] == "connected"
            await ads.stop()

            # The proxied stream ends with the upstream's status: nothing is left half-open.
            await ads.wait_for(lambda: proxy.snapshot()["streams"]["active"] == [], what="downstream stream ended")
            snap = proxy.snapshot()
            assert snap["upstream"]["last_disconnect"]["side"] == "upstream"
            assert snap["upstream"]["last_disconnect"]["code"] != "OK"
            assert snap["upstream"]["state"] in ("idle", "connecting")
            # Envoy keeps serving its last config while the upstream is away (and keeps retrying).
            await asyncio.sleep(1.0)
            assert await envoy.names() == ({"c1"}, {"l1"})
            assert proxy.snapshot()["streams"]["total"] >= 2
            # Envoy kept re-opening: each attempt was a new stream that failed upstream.
            assert proxy.snapshot()["upstream"]["last_disconnect"]["side"] == "upstream"

            ads = AdsServer(pki.server_key_pem, pki.server_cert_pem, None, port)
            ads.set_resources(CDS, [("c1", cluster("c1")), ("c2", cluster("c2"))])
            ads.set_resources(LDS, [("l1", listener("l1", "c1")), ("l2", listener("l2", "c2"))])
            await ads.start()
            await envoy.wait_names({"c1", "c2"}, {"l1", "l2"})
            stream = ads.streams[0]
            # Envoy replayed its subscriptions from scratch on the new stream, node first.
            assert stream.requests[0].node.id
            assert proxy.snapshot()["upstream"]["state"] == "connected"
    finally:
        await ads.stop()


async def test_client_certificate_reaches_upstream(tmp_path: Path, pki: XdsPki) -> None:
    ads = AdsServer(pki.server_key_pem, pki.server_cert_pem, pki.root_pem, free_port())
    ads.set_resources(CDS, [("c1", cluster("c1"))])
    await ads.start()
    offered: list[int] = []

    def client_cert() -> tuple[bytes, bytes] | None:
        offered.append(1)
        return pki.client_key_pem, pki.client_cert_pem

    settings = XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads, token=False), dns_enabled=False
    )
    try:
        async with (
            running_proxy(settings, client_cert=client_cert),
            running_envoy(tmp_path, settings.socket_path, "DELTA_GRPC") as envoy,
        ):
            await envoy.wait_names({"c1"}, set())
            stream = ads.streams[0]
            assert stream.peer_cert_pem is not None
            cert = x509.load_pem_x509_certificate(stream.peer_cert_pem)
            uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [SPIFFE_ID]
            assert "authorization" not in stream.metadata
            assert stream.metadata["clusterid"] == "Kubernetes"
            assert offered
    finally:
        await ads.stop()


async def test_rejected_handshake_is_reported_and_envoy_gets_nothing(tmp_path: Path, pki: XdsPki) -> None:
    # The server wants a client certificate; the identity has none yet.
    ads = AdsServer(pki.server_key_pem, pki.server_cert_pem, pki.root_pem, free_port())
    ads.set_resources(CDS, [("c1", cluster("c1"))])
    await ads.start()
    settings = XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads, token=False), dns_enabled=False
    )
    try:
        async with (
            running_proxy(settings, client_cert=lambda: None) as proxy,
            running_envoy(tmp_path, settings.socket_path, "DELTA_GRPC") as envoy,
        ):
            await ads.wait_for(lambda: proxy.snapshot()["upstream"]["last_disconnect"], what="a failed stream")
            last = proxy.snapshot()["upstream"]["last_disconnect"]
            assert (last["side"], last["code"]) == ("upstream", "UNAVAILABLE")
            assert ads.streams == []
            assert await envoy.names() == (set(), set())
    finally:
        await ads.stop()
