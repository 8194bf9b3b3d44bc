"""The proxy reads istiod's view of this VM from the EDS it forwards: a lost report is re-sent, a report EDS
already shows needs no confirmation. A bare gRPC client stands in for Envoy; the ADS server pushes the EDS."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from envoy.config.core.v3 import health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

from tests.integration.xds.ads_server import CDS, AdsServer, AdsStream, pack
from tests.integration.xds.conftest import running_proxy, upstream_settings
from tests.integration.xds.pki import XdsPki
from tests.integration.xds.test_streams import open_delta, request
from vm_agent.health.event import HealthEvent
from vm_agent.proto import HEALTH_INFO_TYPE_URL
from vm_agent.xds import ReportPolicy, XdsSettings
from vm_agent.xds.eds_witness import ENDPOINT_TYPE_URL

pytestmark = pytest.mark.integration

ME = "10.200.0.7"
CLUSTER = "outbound|8080||vm-app.vm-ns.svc.cluster.local"


def eds(stream: AdsStream, *addresses: str) -> None:
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER)
    group = cla.endpoints.add()
    for address in addresses:
        lb = group.lb_endpoints.add()
        lb.endpoint.address.socket_address.address = address
        lb.endpoint.address.socket_address.port_value = 8080
        lb.health_status = health_check_pb2.HEALTHY
    stream.push(
        discovery_pb2.DeltaDiscoveryResponse(
            type_url=ENDPOINT_TYPE_URL, resources=[discovery_pb2.Resource(name=CLUSTER, resource=pack(cla))]
        )
    )


def reports(stream: AdsStream) -> list[bool]:
    """Each health report on the stream: True healthy, False unhealthy."""
    return [not r.HasField("error_detail") for r in stream.requests_of(HEALTH_INFO_TYPE_URL)]


async def test_lost_report_resent_until_eds_shows_it_and_a_confirmed_one_not_repeated(
    tmp_path: Path, pki: XdsPki, ads: AdsServer
) -> None:
    policy = ReportPolicy(confirm_after_s=(0.3, 0.4), settle_s=0.6, resend_cap_s=0.6)
    settings = XdsSettings(
        socket_path=tmp_path / "XDS",
        upstream=upstream_settings(tmp_path, pki, ads),
        dns_enabled=False,
        health=policy,
        instance_ip=ME,
    )
    async with running_proxy(settings) as proxy:
        channel = grpc.aio.insecure_channel(f"unix:{tmp_path / 'XDS'}")
        try:
            call = open_delta(channel)
            proxy.report_health(HealthEvent(True))
            await call.write(request(CDS, node=True))
            await call.read()
            upstream = ads.streams[0]
            await ads.wait_for(lambda: reports(upstream) == [True], what="the replay after istiod's first answer")

            # istiod took it: the next push holds our endpoint, so the confirmation is left out.
            eds(upstream, ME, "10.200.0.8")
            await call.read()
            await asyncio.sleep(1.0)
            assert reports(upstream) == [True]
            snap = proxy.snapshot()["health"]
            assert snap["skipped_confirmations"] == 1
            assert snap["eds_clusters"] == [CLUSTER]

            # "unhealthy" is lost: EDS keeps showing the endpoint, so the report goes out again, with backoff.
            proxy.report_health(HealthEvent(False, "HTTP 503"))
            eds(upstream, ME, "10.200.0.8")
            await call.read()
            await ads.wait_for(lambda: len(reports(upstream)) >= 4, what="re-sends of the lost report", timeout=10)
            assert reports(upstream)[1:] == [False] * (len(reports(upstream)) - 1)
            assert proxy.snapshot()["health"]["sent_by_reason"].get("unconfirmed", 0) >= 1

            # Now istiod shows it: the re-sends stop.
            eds(upstream, "10.200.0.8")
            await call.read()
            await asyncio.sleep(0.2)
            settled = len(reports(upstream))
            await asyncio.sleep(2.0)
            assert len(reports(upstream)) == settled
            call.cancel()
        finally:
            await channel.close()
