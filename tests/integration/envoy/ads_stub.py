"""A tiny ADS server on a Unix socket that answers every request with an empty response of its type.

Enough for Envoy to apply CDS and LDS (zero resources) and go LIVE; both SotW and Delta.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from tests.helpers.net import free_port
from vm_agent.envoy import EnvoySettings, NodeInfo

LISTENER_TYPE_URL = "type.googleapis.com/envoy.config.listener.v3.Listener"


def inbound_listener(port: int) -> listener_pb2.Listener:
    """An INBOUND HTTP listener on 127.0.0.1:port answering 200 itself, so a drain has something to drain."""
    hcm = http_connection_manager_pb2.HttpConnectionManager(
        stat_prefix="inbound_test",
        route_config=route_pb2.RouteConfiguration(
            virtual_hosts=[
                route_components_pb2.VirtualHost(
                    name="inbound",
                    domains=["*"],
                    routes=[
                        route_components_pb2.Route(
                            match=route_components_pb2.RouteMatch(prefix="/"),
                            direct_response=route_components_pb2.DirectResponseAction(status=200),
                        )
                    ],
                )
            ]
        ),
        http_filters=[
            http_connection_manager_pb2.HttpFilter(
                name="envoy.filters.http.router", typed_config=_pack(router_pb2.Router())
            )
        ],
    )
    return listener_pb2.Listener(
        name="inbound_test",
        traffic_direction=base_pb2.INBOUND,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=_pack(hcm)
                    )
                ]
            )
        ],
    )


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class _Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    def __init__(self, inbound_port: int | None) -> None:
        self._nonce = itertools.count(1)
        self.streams = 0
        self._listeners = [inbound_listener(inbound_port)] if inbound_port else []

    def _resources(self, type_url: str) -> list[listener_pb2.Listener]:
        return self._listeners if type_url == LISTENER_TYPE_URL else []

    async def StreamAggregatedResources(
        self, requests: AsyncIterator[discovery_pb2.DiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        self.streams += 1
        async for req in requests:
            if req.response_nonce:  # an ACK or NACK
                continue
            yield discovery_pb2.DiscoveryResponse(
                type_url=req.type_url,
                version_info="1",
                nonce=str(next(self._nonce)),
                resources=[_pack(r) for r in self._resources(req.type_url)],
            )

    async def DeltaAggregatedResources(
        self, requests: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[discovery_pb2.DeltaDiscoveryResponse]:
        self.streams += 1
        async for req in requests:
            if req.response_nonce:
                continue
            yield discovery_pb2.DeltaDiscoveryResponse(
                type_url=req.type_url,
                system_version_info="1",
                nonce=str(next(self._nonce)),
                resources=[
                    discovery_pb2.Resource(name=r.name, version="1", resource=_pack(r))
                    for r in self._resources(req.type_url)
                ],
            )


class AdsStub:
    def __init__(self, socket_path: Path, inbound_port: int | None = None) -> None:
        self.socket_path = socket_path
        self.inbound_port = inbound_port
        self.servicer = _Ads(inbound_port)
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self._server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.servicer, self._server)
        self._server.add_insecure_port(f"unix:{self.socket_path}")
        await self._server.start()

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)


def envoy_settings_for_test(tmp: Path, **overrides: object) -> EnvoySettings:
    """Settings for a real Envoy on free loopback ports, talking ADS to ``tmp/XDS``."""
    values: dict[str, object] = {
        "binary": None,
        "config_dir": tmp / "proxy",
        "node": NodeInfo(
            id="sidecar~127.0.0.1~vm-1.ns1~ns1.svc.cluster.local",
            cluster="vm.ns1",
            metadata={"ISTIO_VERSION": "1.28.0", "NAMESPACE": "ns1", "INSTANCE_IPS": "127.0.0.1"},
        ),
        "xds_socket": tmp / "XDS",
        "sds_socket": tmp / "sds",
        "admin_port": free_port(),
        "status_port": free_port(),
        "readiness_port": free_port(),
        "prometheus_port": free_port(),
        "concurrency": 1,
        "pid_file": tmp / "state" / "envoy.pid",
    }
    values.update(overrides)
    return EnvoySettings(**values)  # type: ignore[arg-type]
