"""A real Envoy behind the proxy's Unix socket, a TLS ADS server in front of it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2

from tests.integration.xds.ads_server import CDS, LDS, AdsServer
from tests.integration.xds.conftest import TOKEN, running_proxy, upstream_settings
from tests.integration.xds.envoy_run import NODE_ID, running_envoy
from tests.integration.xds.pki import XdsPki
from vm_agent.xds import XdsSettings

pytestmark = pytest.mark.integration


def cluster(name: str) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.STATIC)
    c.connect_timeout.FromMilliseconds(1000)
    return c


def listener(name: str, cluster_name: str) -> listener_pb2.Listener:
    lis = listener_pb2.Listener(name=name)
    lis.address.socket_address.address = "127.0.0.1"
    # Distinct addresses: Envoy refuses two listeners on one address, bound or not.
    lis.address.socket_address.port_value = 10_000 + sum(name.encode())
    # Never bound: the test only reads the config, and several engineers share this machine's ports.
    lis.bind_to_port.value = False
    chain = lis.filter_chains.add()
    f = chain.filters.add(name="envoy.filters.network.tcp_proxy")
    from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2

    f.typed_config.Pack(tcp_proxy_pb2.TcpProxy(stat_prefix="t", cluster=cluster_name))
    return lis


@pytest.mark.parametrize("api_type", ["DELTA_GRPC", "GRPC"])
async def test_envoy_gets_listeners_and_clusters(tmp_path: Path, pki: XdsPki, ads: AdsServer, api_type: str) -> None:
    ads.set_resources(CDS, [("c1", cluster("c1"))])
    ads.set_resources(LDS, [("l1", listener("l1", "c1"))])
    settings = XdsSettings(
        socket_path=tmp_path / "XDS", upstream=upstream_settings(tmp_path, pki, ads), dns_enabled=False
    )
    async with running_proxy(settings) as proxy, running_envoy(tmp_path, settings.socket_path, api_type) as envoy:
        assert stat.S_IMODE(settings.socket_path.stat().st_mode) == 0o660
        await envoy.wait_names({"c1"}, {"l1"})
        stream = ads.streams[0]
        assert stream.delta == (api_type == "DELTA_GRPC")
        # Server side: the credentials and cluster id the proxy attached.
        assert stream.metadata["authorization"] == f"Bearer {TOKEN}"
        assert stream.metadata["clusterid"] == "Kubernetes"
        assert stream.metadata["x-test-header"] == "yes"
        assert stream.peer_cert_pem is None
        # Envoy's own first message (with its node) went through untouched.
        assert stream.requests[0].node.id == NODE_ID
        # A change is pushed through the same stream.
        ads.set_resources(CDS, [("c1", cluster("c1")), ("c2", cluster("c2"))])
        await envoy.wait_names({"c1", "c2"}, {"l1"})
        # Envoy ACKed what it got; the proxy saw it.
        await ads.wait_for(lambda: proxy.snapshot()["types"].get(CDS, {}).get("acks", 0) >= 2, what="CDS ACKs")
        snap = proxy.snapshot()
        assert snap["upstream"]["state"] == "connected"
        assert snap["types"][LDS]["forwarded"] >= 1
        assert snap["types"][CDS]["nacks"] == 0
