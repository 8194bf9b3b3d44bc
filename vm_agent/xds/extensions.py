"""Make istiod's configuration fit stock Envoy: drop the filters only istio-proxy implements.

pilot-agent runs istio-proxy (Envoy plus Istio's extensions); vm-agent ships stock Envoy. With its defaults a
real istiod puts four istio-proxy-only filter configs into CDS and LDS, and stock Envoy rejects the whole
update for any one of them (found by the interop suite, docs/interop.md). Removing exactly those filters
costs Istio's peer-metadata telemetry, standard metrics and ALPN hints; routing and mTLS are unaffected.

Only Listener and Cluster responses that contain one of the config type names are decoded; everything else
keeps passing through as bytes.
"""

from __future__ import annotations

from collections import Counter

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from udpa.type.v1 import typed_struct_pb2 as udpa_typed_struct_pb2
from xds.type.v3 import typed_struct_pb2 as xds_typed_struct_pb2

LISTENER_TYPE_URL = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

# Extensions only istio-proxy has, as istiod names their config types (TypedStruct-wrapped or not).
ISTIO_PROXY_ONLY = frozenset(
    {
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        "io.istio.http.peer_metadata.Config",
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        "stats.PluginConfig",
    }
)
_MARKERS = tuple(name.encode() for name in ISTIO_PROXY_ONLY)
_HCM = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_TYPED_STRUCTS = (xds_typed_struct_pb2.TypedStruct, udpa_typed_struct_pb2.TypedStruct)


def config_type(any_: any_pb2.Any) -> str:
    """A filter's real config type: istiod wraps out-of-tree extensions in a TypedStruct."""
    name = any_.type_url.rsplit("/", 1)[-1]
    for cls in _TYPED_STRUCTS:
        if name == cls.DESCRIPTOR.full_name:
            ts = cls()
            any_.Unpack(ts)
            return str(ts.type_url).rsplit("/", 1)[-1]
    return name


class _Stripper:
    def __init__(self) -> None:
        self.dropped: Counter[str] = Counter()

    def keep(self, any_: any_pb2.Any) -> bool:
        kind = config_type(any_)
        if kind in ISTIO_PROXY_ONLY:
            self.dropped[kind] += 1
            return False
        return True

    def chain(self, fc: listener_components_pb2.FilterChain) -> None:
        kept = [f for f in fc.filters if self.keep(f.typed_config)]
        for f in kept:
            if config_type(f.typed_config) == _HCM:
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                http = [h for h in hcm.http_filters if self.keep(h.typed_config)]
                if len(http) != len(hcm.http_filters):
                    del hcm.http_filters[:]
                    hcm.http_filters.extend(http)
                    f.typed_config.Pack(hcm)
        if len(kept) != len(fc.filters):
            del fc.filters[:]
            fc.filters.extend(kept)

    def listener(self, lis: listener_pb2.Listener) -> None:
        for fc in lis.filter_chains:
            self.chain(fc)
        if lis.HasField("default_filter_chain"):
            self.chain(lis.default_filter_chain)

    def cluster(self, c: cluster_pb2.Cluster) -> None:
        kept = [f for f in c.filters if self.keep(f.typed_config)]
        if len(kept) != len(c.filters):
            del c.filters[:]
            c.filters.extend(kept)

    def resource(self, any_: any_pb2.Any) -> None:
        if not any(m in any_.value for m in _MARKERS):
            return
        if any_.type_url == LISTENER_TYPE_URL:
            lis = listener_pb2.Listener()
            any_.Unpack(lis)
            self.listener(lis)
            any_.Pack(lis)
        elif any_.type_url == CLUSTER_TYPE_URL:
            c = cluster_pb2.Cluster()
            any_.Unpack(c)
            self.cluster(c)
            any_.Pack(c)


def strip_istio_proxy_filters(message: bytes, type_url: str, *, delta: bool) -> tuple[bytes, dict[str, int]]:
    """The response with istio-proxy-only filters removed, and how many of each were dropped.

    Returns the original bytes untouched when the response is not LDS/CDS or holds none of them.
    """
    if type_url not in (LISTENER_TYPE_URL, CLUSTER_TYPE_URL) or not any(m in message for m in _MARKERS):
        return message, {}
    stripper = _Stripper()
    if delta:
        dresp = discovery_pb2.DeltaDiscoveryResponse.FromString(message)
        for res in dresp.resources:
            if res.HasField("resource"):
                stripper.resource(res.resource)
        out = dresp.SerializeToString()
    else:
        resp = discovery_pb2.DiscoveryResponse.FromString(message)
        for any_ in resp.resources:
            stripper.resource(any_)
        out = resp.SerializeToString()
    if not stripper.dropped:
        return message, {}
    return out, dict(stripper.dropped)
