"""Stream lifecycle seen from a bare gRPC client on the proxy's socket (as Istio's own proxy tests do)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from tests.integration.xds.ads_server import CDS, LDS, AdsServer
from tests.integration.xds.conftest import running_proxy, upstream_settings
from tests.integration.xds.pki import XdsPki
from vm_agent.health.event import HealthEvent
from vm_agent.metrics import REGISTRY
from vm_agent.proto import HEALTH_INFO_TYPE_URL
from vm_agent.xds import XdsSettings

pytestmark = pytest.mark.integration

DELTA = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"


@pytest.fixture
async def channel(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    ch = grpc.aio.insecure_channel(f"unix:{tmp_path / 'XDS'}", options=[("grpc.max_receive_message_length", -1)])
    try:
        yield ch
    finally:
        await ch.close()


def open_delta(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(
        DELTA,
        request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
        response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
    )()


def request(type_url: str, node: bool = False) -> discovery_pb2.DeltaDiscoveryRequest:
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url)
    if node:
        req.node.id = "sidecar~127.0.0.1~vm.vm-ns~vm-ns.svc.cluster.local"
    return req


def settings_for(tmp_path: Path, pki: XdsPki, ads: AdsServer, **kw: Any) -> XdsSettings:
    return XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads), dns_enabled=False, **kw
    )


async def test_newer_stream_closes_older_and_gets_health(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    async with running_proxy(settings_for(tmp_path, pki, ads)) as proxy:
        proxy.report_health(HealthEvent(True))
        first = open_delta(channel)
        await first.write(request(CDS, node=True))
        assert (await first.read()).type_url == CDS
        upstream1 = ads.streams[0]

        second = open_delta(channel)
        await second.write(request(CDS, node=True))
        assert (await second.read()).type_url == CDS
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await first.read()
        assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "newer" in (ended.value.details() or "")
        await ads.wait_for(lambda: upstream1.done, what="the older upstream stream closed")

        upstream2 = ads.streams[1]
        # Each stream carries the current state once istiod answered it; the replaced one carries nothing more.
        await ads.wait_for(lambda: upstream2.requests_of(HEALTH_INFO_TYPE_URL), what="health on the newer stream")
        assert len(upstream1.requests_of(HEALTH_INFO_TYPE_URL)) <= 1
        assert [s["id"] for s in proxy.snapshot()["streams"]["active"]] == [2]
        json.dumps(proxy.snapshot())  # JSON-able for /debug and `vm-agent status`


async def test_envoy_cancel_closes_upstream(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    before = REGISTRY.get_sample_value(
        "vm_agent_xds_disconnects_total", {"side": "downstream", "code": "CANCELLED", "reason": "expected"}
    )
    async with running_proxy(settings_for(tmp_path, pki, ads)) as proxy:
        call = open_delta(channel)
        await call.write(request(CDS, node=True))
        await call.read()
        upstream = ads.streams[0]
        call.cancel()
        await ads.wait_for(lambda: upstream.done, what="upstream stream closed after Envoy cancelled")
        await ads.wait_for(lambda: proxy.snapshot()["streams"]["active"] == [], what="stream forgotten")
        assert proxy.snapshot()["upstream"]["last_disconnect"]["side"] == "downstream"
    after = REGISTRY.get_sample_value(
        "vm_agent_xds_disconnects_total", {"side": "downstream", "code": "CANCELLED", "reason": "expected"}
    )
    assert (after or 0) - (before or 0) == 1


async def test_large_response_passes_and_large_request_is_refused(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    async with running_proxy(settings_for(tmp_path, pki, ads, max_downstream_message_bytes=64 * 1024)):
        call = open_delta(channel)
        await call.write(request(CDS, node=True))
        await call.read()
        # Bigger than gRPC's default 4 MiB limit: responses are bounded only by the upstream.
        blob = any_pb2.Any(type_url=CDS, value=b"x" * (6 * 1024 * 1024))
        nonce = ads.streams[0].push(
            discovery_pb2.DeltaDiscoveryResponse(type_url=CDS, resources=[discovery_pb2.Resource(resource=blob)])
        )
        big = await call.read()
        assert big.nonce == nonce
        assert len(big.resources[0].resource.value) == 6 * 1024 * 1024

        huge = request(CDS)
        huge.resource_names_subscribe.extend(f"cluster-{i:08d}" for i in range(10_000))
        await call.write(huge)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        await ads.wait_for(lambda: ads.streams[0].done, what="upstream closed with the refused stream")
        assert all(len(r.resource_names_subscribe) < 10_000 for r in ads.streams[0].requests)


async def test_slow_envoy_backpressures_upstream_and_requests_still_flow(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    async with running_proxy(settings_for(tmp_path, pki, ads)):
        call = open_delta(channel)
        await call.write(request(CDS, node=True))
        await call.read()
        upstream = ads.streams[0]
        blob = any_pb2.Any(type_url=CDS, value=b"y" * (1024 * 1024))
        nonces = [
            upstream.push(
                discovery_pb2.DeltaDiscoveryResponse(type_url=CDS, resources=[discovery_pb2.Resource(resource=blob)])
            )
            for _ in range(64)
        ]
        # Nobody reads on the Envoy side: the proxy must stop pulling from upstream instead of buffering
        # 64 MiB, so the server's own queue stops draining.
        await ads.wait_for(lambda: upstream.outbox.qsize() > 0, what="server-side backpressure")
        seen: list[int] = []
        await ads.wait_for(lambda: _stable(seen, upstream.outbox.qsize()), what="a stalled server queue")
        assert upstream.outbox.qsize() >= 32
        # The other direction is independent: Envoy's requests still reach the upstream.
        await call.write(request(LDS))
        await ads.wait_for(lambda: upstream.requests_of(LDS), what="a request past the stalled responses")
        # Nothing was lost or reordered once Envoy reads again.
        got = [(await call.read()).nonce for _ in nonces]
        assert got == nonces


def _stable(seen: list[int], value: int) -> bool:
    """True once the same value was seen 10 times in a row (the caller polls every 50 ms)."""
    seen.append(value)
    return len(seen) >= 10 and len(set(seen[-10:])) == 1


async def test_run_binds_0660_and_removes_socket_on_cancel(tmp_path: Path, pki: XdsPki, ads: AdsServer) -> None:
    settings = settings_for(tmp_path, pki, ads)
    async with running_proxy(settings) as proxy:
        assert proxy.ready.is_set()
        assert settings.socket_path.stat().st_mode & 0o777 == 0o660
        assert proxy.snapshot()["upstream"]["state"] == "idle"
    assert not settings.socket_path.exists()
    assert not proxy.ready.is_set()


async def test_unusable_client_certificate_fails_the_stream_not_the_proxy(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    async with running_proxy(settings_for(tmp_path, pki, ads), client_cert=lambda: (b"not a key", b"not a chain")) as p:
        call = open_delta(channel)
        # The proxy ends the stream as soon as it opens, before Envoy's first request could be relayed.
        assert await call.code() is grpc.StatusCode.UNAVAILABLE
        last = p.snapshot()["upstream"]["last_disconnect"]
        assert (last["side"], last["code"]) == ("upstream", "UNAVAILABLE")
        assert p.ready.is_set()


async def test_flush_waits_for_the_last_health_report(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    ads.held.add(CDS)
    async with running_proxy(settings_for(tmp_path, pki, ads)) as proxy:
        call = open_delta(channel)
        await call.write(request(CDS, node=True))
        await ads.wait_for(lambda: ads.streams and ads.streams[0].requests_of(CDS), what="CDS upstream")
        assert await proxy.flush(1.0) is False  # istiod has not answered yet: nothing may be sent
        ads.release(CDS)
        await call.read()
        proxy.report_health(HealthEvent(False, "agent is shutting down"))
        assert await proxy.flush(5.0) is True
        await ads.wait_for(
            lambda: ads.streams[0].requests_of(HEALTH_INFO_TYPE_URL), what="the report at the server", timeout=5
        )
        assert ads.streams[0].requests_of(HEALTH_INFO_TYPE_URL)[-1].error_detail.message == "agent is shutting down"
        call.cancel()
        await ads.wait_for(lambda: proxy.snapshot()["streams"]["active"] == [], what="stream gone")
        assert await proxy.flush(0.5) is False
