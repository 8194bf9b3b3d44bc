"""NDS interception, non-Envoy types and health reports, with a real Envoy downstream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from tests.helpers.net import free_port
from tests.integration.xds.ads_server import CDS, LDS, AdsServer, AdsStream, pack
from tests.integration.xds.conftest import running_proxy, upstream_settings
from tests.integration.xds.envoy_run import running_envoy
from tests.integration.xds.pki import XdsPki
from tests.integration.xds.test_proxy_envoy import cluster, listener
from vm_agent.health.event import HealthEvent
from vm_agent.proto import HEALTH_INFO_TYPE_URL, NAME_TABLE_TYPE_URL, nds_pb2
from vm_agent.xds import ReportPolicy, XdsSettings

pytestmark = pytest.mark.integration

NDS = NAME_TABLE_TYPE_URL


def name_table(**hosts: str) -> nds_pb2.NameTable:
    table = nds_pb2.NameTable()
    for host, ip in hosts.items():
        table.table[host.replace("_", ".")].ips.append(ip)
    return table


def push(stream: AdsStream, type_url: str, resources: list[any_pb2.Any], version: str = "1") -> str:
    if stream.delta:
        return stream.push(
            discovery_pb2.DeltaDiscoveryResponse(
                type_url=type_url,
                system_version_info=version,
                resources=[discovery_pb2.Resource(version=version, resource=r) for r in resources],
            )
        )
    return stream.push(discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version, resources=resources))


def answers_to(stream: AdsStream, nonce: str) -> list[discovery_pb2.DiscoveryRequest]:
    return [r for r in stream.requests if r.response_nonce == nonce]


def first_index(stream: AdsStream, type_url: str) -> int:
    return next(i for i, r in enumerate(stream.requests) if r.type_url == type_url)


@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
async def test_name_table_goes_to_callback_never_to_envoy(
    tmp_path: Path, pki: XdsPki, ads: AdsServer, api_type: str
) -> None:
    tables: list[nds_pb2.NameTable] = []

    async def on_name_table(table: nds_pb2.NameTable) -> None:
        if "bad.example" in table.table:
            raise ValueError("bad.example has no usable address")
        tables.append(table)

    ads.set_resources(CDS, [("c1", cluster("c1"))])
    ads.set_resources(LDS, [("l1", listener("l1", "c1"))])
    settings = XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads), dns_enabled=True
    )
    async with (
        running_proxy(settings, on_name_table=on_name_table) as proxy,
        running_envoy(tmp_path, settings.socket_path, api_type) as envoy,
    ):
        await envoy.wait_names({"c1"}, {"l1"})
        stream = ads.streams[0]
        await ads.wait_for(lambda: stream.requests_of(NDS), what="NDS subscription")
        # Injected right after Envoy's first LDS request, never before; a wildcard subscription.
        assert first_index(stream, NDS) > first_index(stream, LDS)
        subscribe = stream.requests_of(NDS)[0]
        assert not subscribe.response_nonce
        assert not (subscribe.resource_names_subscribe if stream.delta else subscribe.resource_names)

        empty = push(stream, NDS, [], "0")
        good = push(stream, NDS, [pack(name_table(a_example="10.0.0.1"))], "1")
        await ads.wait_for(lambda: answers_to(stream, good), what="ACK of the NameTable")
        assert [dict(t.table) for t in tables] == [{"a.example": name_table(a_example="10.0.0.1").table["a.example"]}]
        (ack,) = answers_to(stream, good)
        assert ack.type_url == NDS
        assert not ack.HasField("error_detail")
        if not stream.delta:
            assert ack.version_info == "1"
        # An empty NameTable response is neither applied nor ACKed.
        assert answers_to(stream, empty) == []

        rejected = push(stream, NDS, [pack(name_table(bad_example="10.0.0.2"))], "2")
        garbage = push(stream, NDS, [any_pb2.Any(type_url=NDS, value=b"\x0a\x05\x0a\x03")], "3")
        await ads.wait_for(lambda: answers_to(stream, garbage), what="NACK of the undecodable NameTable")
        (nack,) = answers_to(stream, rejected)
        assert nack.error_detail.code == 13
        assert nack.error_detail.message == "bad.example has no usable address"
        (nack2,) = answers_to(stream, garbage)
        assert nack2.error_detail.code == 13
        assert nack2.error_detail.message
        assert len(tables) == 1

        # A later Envoy type still flows on the same stream, so everything before it was handled.
        ads.set_resources(CDS, [("c1", cluster("c1")), ("c2", cluster("c2"))])
        await envoy.wait_names({"c1", "c2"}, {"l1"})
        log = envoy.log()
        assert "envoy.config.cluster.v3.Cluster" in log
        assert "NameTable" not in log
        nds_state = proxy.snapshot()["types"][NDS]
        assert (nds_state["consumed"], nds_state["forwarded"]) == (4, 0)
        assert (nds_state["acks"], nds_state["nacks"]) == (1, 2)
        assert nds_state["last_nack_message"]


async def test_non_envoy_types_are_dropped(tmp_path: Path, pki: XdsPki, ads: AdsServer) -> None:
    ads.set_resources(CDS, [("c1", cluster("c1"))])
    settings = XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads), dns_enabled=False
    )
    async with running_proxy(settings) as proxy, running_envoy(tmp_path, settings.socket_path, "DELTA_GRPC") as envoy:
        await envoy.wait_names({"c1"}, set())
        stream = ads.streams[0]
        # With DNS off, even a NameTable is just a foreign type.
        for type_url in (NDS, "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig", "type.googleapis.com/x.Y"):
            push(stream, type_url, [pack(name_table(a_example="10.0.0.1"))])
        ads.set_resources(CDS, [("c2", cluster("c2"))])
        await envoy.wait_names({"c2"}, set())
        log = envoy.log()
        assert "envoy.config.cluster.v3.Cluster" in log
        for word in ("NameTable", "ProxyConfig", "x.Y"):
            assert word not in log
        types = proxy.snapshot()["types"]
        for type_url in (NDS, "type.googleapis.com/istio.mesh.v1alpha1.ProxyConfig", "type.googleapis.com/x.Y"):
            assert (types[type_url]["dropped"], types[type_url]["forwarded"]) == (1, 0)
        assert stream.requests_of(NDS) == []


def health_requests(stream: AdsStream) -> list[discovery_pb2.DiscoveryRequest]:
    return stream.requests_of(HEALTH_INFO_TYPE_URL)


# Short windows so the test sees the confirmation; the agent uses 5-15 s.
FAST = ReportPolicy(confirm_after_s=(0.2, 0.4), settle_s=1.0)


async def steady(stream: AdsStream, seconds: float) -> int:
    """The number of health reports once ``seconds`` passed without a new one."""
    count = len(health_requests(stream))
    while True:
        await asyncio.sleep(seconds)
        if len(health_requests(stream)) == count:
            return count
        count = len(health_requests(stream))


@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
async def test_health_waits_for_istiods_first_answer_then_replays_and_confirms_once(
    tmp_path: Path, pki: XdsPki, api_type: str
) -> None:
    port = free_port()
    ads = AdsServer(pki.server_key_pem, pki.server_cert_pem, None, port)
    await ads.start()
    # Holding CDS keeps the server from answering anything: istiod drops a report it gets before that.
    ads.held.add(CDS)
    settings = XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads), dns_enabled=False, health=FAST
    )
    try:
        async with running_proxy(settings) as proxy, running_envoy(tmp_path, settings.socket_path, api_type) as envoy:
            proxy.report_health(HealthEvent(False, "connection refused"))
            stream = await ads.wait_stream()
            await ads.wait_for(lambda: stream.requests_of(CDS), what="CDS request")
            proxy.report_health(HealthEvent(False, "HTTP 503"))
            await asyncio.sleep(1.0)  # longer than the confirmation window: nothing may go out unanswered
            assert health_requests(stream) == []
            assert proxy.snapshot()["health"]["last_sent"] is None

            ads.release(CDS)
            await ads.wait_for(lambda: health_requests(stream), what="health replay after the first answer")
            assert first_index(stream, HEALTH_INFO_TYPE_URL) > first_index(stream, CDS)
            replay = health_requests(stream)[0]
            assert (replay.error_detail.code, replay.error_detail.message) == (13, "HTTP 503")
            assert not replay.HasField("node")
            # The replay plus one confirmation, then silence: a steady VM costs istiod nothing.
            assert await steady(stream, 1.0) == 2
            assert health_requests(stream)[1].error_detail.message == "HTTP 503"

            proxy.report_health(HealthEvent(True, ""))
            await ads.wait_for(lambda: not health_requests(stream)[-1].HasField("error_detail"), what="healthy report")
            assert await steady(stream, 1.0) == 4
            assert all(not r.HasField("error_detail") for r in health_requests(stream)[2:])
            assert proxy.snapshot()["health"]["sent_by_reason"] == {"reconnect": 1, "confirm": 2, "transition": 1}

            # A report made while the upstream is away is kept and goes out on the next stream, after its first answer.
            await ads.stop()
            await ads.wait_for(lambda: proxy.snapshot()["upstream"]["state"] != "connected", what="upstream gone")
            proxy.report_health(HealthEvent(False, "timeout"))
            ads = AdsServer(pki.server_key_pem, pki.server_cert_pem, None, port)
            await ads.start()
            stream2 = await ads.wait_stream(timeout=40)  # the pacer may hold the redial for up to its backoff
            await ads.wait_for(lambda: health_requests(stream2), what="health replay on the new stream")
            assert first_index(stream2, HEALTH_INFO_TYPE_URL) > 0
            first = health_requests(stream2)[0]
            assert (first.error_detail.code, first.error_detail.message) == (13, "timeout")
            assert await steady(stream2, 1.0) == 2
            await envoy.wait_names(set(), set())
            health = proxy.snapshot()["health"]
            assert health["last_sent"] == {"healthy": False, "message": "timeout"}
    finally:
        await ads.stop()


async def test_heartbeat_when_configured(tmp_path: Path, pki: XdsPki, ads: AdsServer) -> None:
    ads.set_resources(CDS, [("c1", cluster("c1"))])
    policy = ReportPolicy(confirm_after_s=(60, 60), heartbeat_s=0.3)
    settings = XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads), dns_enabled=False, health=policy
    )
    async with running_proxy(settings) as proxy, running_envoy(tmp_path, settings.socket_path, "GRPC"):
        proxy.report_health(HealthEvent(True))
        stream = await ads.wait_stream()
        await ads.wait_for(lambda: len(health_requests(stream)) >= 4, what="the replay and three heartbeats")
        assert proxy.snapshot()["health"]["sent_by_reason"]["heartbeat"] >= 3
