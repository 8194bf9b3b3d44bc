"""Stock Envoy (vm-agent's) against what a default istiod really pushes, in Envoy's validate mode.

data/default-istiod-{cds,lds}.pb are istiod's DiscoveryResponses, byte for byte, as the interop lab captured
them. istiod ran with its default settings and helm's `defaultProviders.metrics: [prometheus]` (docs/interop.md,
"Stock Envoy and istiod defaults"). The first test pins the gap. The second one shows that removing the
istio-proxy-only filters is enough for stock Envoy to take everything else. That is the rule
`without_istio_proxy_filters` states, and the xDS proxy should apply it. Once the xDS proxy has it, use that
function here instead of the local one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from udpa.type.v1 import typed_struct_pb2 as udpa_typed_struct_pb2
from xds.type.v3 import typed_struct_pb2 as xds_typed_struct_pb2

from vm_agent.envoy_binary import find_envoy_binary

pytestmark = [pytest.mark.integration]

DATA = Path(__file__).parent / "data"
# Extensions only istio-proxy has, as istiod names their config types (TypedStruct-wrapped or not).
ISTIO_PROXY_ONLY = frozenset(
    {
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        "io.istio.http.peer_metadata.Config",
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        "stats.PluginConfig",
    }
)
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def config_type(any_: any_pb2.Any) -> str:
    """The filter's real config type: istiod wraps out-of-tree extensions in a TypedStruct."""
    name = any_.type_url.rsplit("/", 1)[-1]
    for cls in (xds_typed_struct_pb2.TypedStruct, udpa_typed_struct_pb2.TypedStruct):
        if name == cls.DESCRIPTOR.full_name:
            ts = cls()
            any_.Unpack(ts)
            return str(ts.type_url).rsplit("/", 1)[-1]
    return name


def without_istio_proxy_filters(
    clusters: list[cluster_pb2.Cluster], listeners: list[listener_pb2.Listener]
) -> dict[str, int]:
    """Drops istio-proxy-only filters from clusters, network filter chains and HCM http_filters in place."""
    dropped: dict[str, int] = {}

    def keep(any_: any_pb2.Any) -> bool:
        kind = config_type(any_)
        if kind in ISTIO_PROXY_ONLY:
            dropped[kind] = dropped.get(kind, 0) + 1
            return False
        return True

    def chain(fc: listener_components_pb2.FilterChain) -> None:
        kept = [f for f in fc.filters if keep(f.typed_config)]
        for f in kept:
            if config_type(f.typed_config) == HCM:
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                http = [h for h in hcm.http_filters if keep(h.typed_config)]
                del hcm.http_filters[:]
                hcm.http_filters.extend(http)
                f.typed_config.Pack(hcm)
        del fc.filters[:]
        fc.filters.extend(kept)

    for c in clusters:
        kept_c = [f for f in c.filters if keep(f.typed_config)]
        del c.filters[:]
        c.filters.extend(kept_c)
    for lis in listeners:
        for fc in lis.filter_chains:
            chain(fc)
        if lis.HasField("default_filter_chain"):
            chain(lis.default_filter_chain)
    return dropped


def istiod_resources() -> tuple[list[cluster_pb2.Cluster], list[listener_pb2.Listener]]:
    clusters, listeners = [], []
    for a in discovery_pb2.DiscoveryResponse.FromString((DATA / "default-istiod-cds.pb").read_bytes()).resources:
        c = cluster_pb2.Cluster()
        a.Unpack(c)
        clusters.append(c)
    for a in discovery_pb2.DiscoveryResponse.FromString((DATA / "default-istiod-lds.pb").read_bytes()).resources:
        lis = listener_pb2.Listener()
        a.Unpack(lis)
        listeners.append(lis)
    return clusters, listeners


def envoy_validate(
    tmp_path: Path, clusters: list[cluster_pb2.Cluster], listeners: list[listener_pb2.Listener]
) -> subprocess.CompletedProcess[str]:
    """Envoy --mode validate on a bootstrap that carries istiod's resources statically (binary .pb bootstrap)."""
    b = bootstrap_pb2.Bootstrap()
    b.node.id = "sidecar~127.0.0.2~vm.vm-ns~vm-ns.svc.cluster.local"
    b.node.cluster = "vm-app.vm-ns"
    for name in ("xds-grpc", "sds-grpc"):  # what istiod's resources refer to; validate mode never dials them
        c = b.static_resources.clusters.add(name=name, type=cluster_pb2.Cluster.STATIC)
        c.load_assignment.cluster_name = name
        c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.pipe.path = str(tmp_path / name)
    ads = b.dynamic_resources.ads_config
    ads.api_type = ads.GRPC
    ads.transport_api_version = 2  # V3
    ads.grpc_services.add().envoy_grpc.cluster_name = "xds-grpc"
    b.static_resources.clusters.extend(clusters)
    b.static_resources.listeners.extend(listeners)
    path = tmp_path / "bootstrap.pb"
    path.write_bytes(b.SerializeToString())
    return subprocess.run(
        [str(find_envoy_binary()), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_stock_envoy_rejects_a_default_istiods_config(tmp_path: Path) -> None:
    clusters, listeners = istiod_resources()
    assert clusters and listeners
    res = envoy_validate(tmp_path, clusters, listeners)
    assert res.returncode != 0
    assert "Didn't find a registered implementation for 'istio.metadata_exchange'" in res.stderr + res.stdout


def test_stock_envoy_takes_the_rest_once_istio_proxy_filters_are_dropped(tmp_path: Path) -> None:
    clusters, listeners = istiod_resources()
    dropped = without_istio_proxy_filters(clusters, listeners)
    assert set(dropped) == ISTIO_PROXY_ONLY, dropped  # all four occur in a default istiod's push
    res = envoy_validate(tmp_path, clusters, listeners)
    assert res.returncode == 0, res.stderr[-2000:]
