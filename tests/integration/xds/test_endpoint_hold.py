"""After istiod's stream is lost and comes back, an EDS update that empties a cluster waits for the hold: the
downstream keeps its endpoints, then gets the empty update from the agent (whose ACK never reaches istiod), unless
istiod refills the cluster first. A bare gRPC client stands in for Envoy; the ADS server stands in for istiod."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from tests.integration.xds.ads_server import CDS, AdsServer, AdsStream, pack
from tests.integration.xds.conftest import running_proxy
from tests.integration.xds.pki import XdsPki
from tests.integration.xds.test_streams import channel, open_delta, request, settings_for
from vm_agent.xds.endpoint_hold import EDS_TYPE_URL, NONCE_PREFIX
from vm_agent.xds.pacing import PacingSettings

pytestmark = pytest.mark.integration
__all__ = ["channel"]  # the fixture, shared with test_streams
CLUSTER = "outbound|80||forum.forum.svc.cluster.local"


def push_eds(stream: AdsStream, *addresses: str) -> None:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER)
    if addresses:
        group = cla.endpoints.add()
        for address in addresses:
            sock = group.lb_endpoints.add().endpoint.address.socket_address
            sock.address, sock.port_value = address, 8080
    stream.push(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=EDS_TYPE_URL, resources=[discovery_pb2.Resource(name=CLUSTER, version="v", resource=pack(cla))]
        )
    )


def endpoints(resp: Any) -> list[str]:
    out = []
    for r in resp.resources:
        cla = endpoint_pb2.ClusterLoadAssignment.FromString(r.resource.value)
        out += [e.endpoint.address.socket_address.address for loc in cla.endpoints for e in loc.lb_endpoints]
    return out


async def next_eds(call: Any) -> Any:
    while True:
        resp = await asyncio.wait_for(call.read(), 10)
        if resp.type_url == EDS_TYPE_URL:
            return resp


async def _drain(call: Any) -> None:
    """Read until the proxy ends the stream (it ends Envoy's stream when istiod ends its own)."""
    with contextlib.suppress(grpc.aio.AioRpcError):
        while await asyncio.wait_for(call.read(), 10) is not grpc.aio.EOF:
            pass


async def connected_then_lost(ads: AdsServer, channel: grpc.aio.Channel) -> tuple[Any, AdsStream]:
    """A first stream that had 10.0.0.1 for the cluster, ended by istiod, and the downstream's next stream."""
    first = open_delta(channel)
    await first.write(request(CDS, node=True))
    await first.read()
    upstream = await ads.wait_stream(1)
    push_eds(upstream, "10.0.0.1")
    assert endpoints(await next_eds(first)) == ["10.0.0.1"]
    upstream.close()  # istiod ends the stream (its restart, a cut link, the max connection age...)
    await _drain(first)
    second = open_delta(channel)
    await second.write(request(CDS, node=True))
    await second.read()
    return second, await ads.wait_stream(2)


async def test_an_emptied_cluster_keeps_its_endpoints_until_the_hold_ends(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    settings = settings_for(
        tmp_path, pki, ads, endpoint_hold_s=1.5, pacing=PacingSettings(base_s=0.05, cap_s=0.1, floor_s=0.01)
    )
    async with running_proxy(settings) as proxy:
        call, upstream = await connected_then_lost(ads, channel)
        push_eds(
            upstream,
        )  # istiod: the VMs behind this cluster have not re-registered yet
        held = await next_eds(call)
        assert endpoints(held) == ["10.0.0.1"]
        # When the hold ends the agent itself delivers istiod's update, and keeps the downstream's ACK.
        released = await next_eds(call)
        assert released.nonce.startswith(NONCE_PREFIX) and endpoints(released) == []
        await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=EDS_TYPE_URL, response_nonce=released.nonce))
        await asyncio.sleep(0.5)
        assert not [r for r in upstream.requests if r.response_nonce.startswith(NONCE_PREFIX)]
        assert proxy.snapshot()["types"][EDS_TYPE_URL]["acks"] >= 1


async def test_a_refilled_cluster_gets_istiods_endpoints_and_nothing_from_the_agent(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    settings = settings_for(
        tmp_path, pki, ads, endpoint_hold_s=1.5, pacing=PacingSettings(base_s=0.05, cap_s=0.1, floor_s=0.01)
    )
    async with running_proxy(settings):
        call, upstream = await connected_then_lost(ads, channel)
        push_eds(upstream)
        assert endpoints(await next_eds(call)) == ["10.0.0.1"]
        push_eds(upstream, "10.0.0.2")  # the callee re-registered
        assert endpoints(await next_eds(call)) == ["10.0.0.2"]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(next_eds(call), 2.5)


async def test_without_a_lost_stream_an_empty_update_goes_through_at_once(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, channel: grpc.aio.Channel
) -> None:
    async with running_proxy(settings_for(tmp_path, pki, ads, endpoint_hold_s=30)):
        call = open_delta(channel)
        await call.write(request(CDS, node=True))
        await call.read()
        upstream = await ads.wait_stream(1)
        push_eds(upstream, "10.0.0.1")
        assert endpoints(await next_eds(call)) == ["10.0.0.1"]
        push_eds(upstream)  # e.g. the only endpoint failed its readiness probe: that must take effect now
        assert endpoints(await next_eds(call)) == []
