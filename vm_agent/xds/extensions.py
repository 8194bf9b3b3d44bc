"""Make istiod's configuration fit stock Envoy: drop the filters only istio-proxy implements.

pilot-agent runs istio-proxy (Envoy plus Istio's extensions); vm-agent ships stock Envoy. With its defaults a
real istiod puts four istio-proxy-only filter configs into CDS and LDS, and stock Envoy rejects the whole
update for any one of them (found by the interop suite, docs/interop.md). Removing exactly those filters
costs Istio's peer-metadata telemetry, standard metrics and ALPN hints; routing and mTLS are unaffected.

The TLS contexts istiod pushes also offer ALPN ``istio-peer-exchange``. istio-proxy's exchange filter writes a
binary preamble into any stream that negotiates it, so a VM without that filter must never negotiate it: a pod's
preamble would land in the VM application's TCP stream. istiod's own answer for such proxies (``DisableMxALPN``)
is to leave the protocol out; the same is done here for every cluster and listener TLS context, keeping every
other protocol in its order.

Only Listener and Cluster responses that contain one of the config type names or that protocol name are decoded;
everything else keeps passing through as bytes.
"""

from __future__ import annotations

from collections import Counter

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
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
PEER_EXCHANGE_ALPN = "istio-peer-exchange"
"""The ALPN that tells a peer's exchange filter to write its preamble (istiod: ``ALPNInMeshWithMxc``)."""
ALPN_DROPPED = f"alpn {PEER_EXCHANGE_ALPN}"
"""How a removed ALPN entry is counted next to the dropped filters."""
_MARKERS = (*(name.encode() for name in ISTIO_PROXY_ONLY), PEER_EXCHANGE_ALPN.encode())
_TLS_CONTEXTS = {
    f"type.googleapis.com/{cls.DESCRIPTOR.full_name}": cls
    for cls in (tls_pb2.UpstreamTlsContext, tls_pb2.DownstreamTlsContext)
}
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

    def transport_socket(self, ts: base_pb2.TransportSocket) -> None:
        """Drop the exchange ALPN from a TLS transport socket; any other socket is left alone."""
        cls = _TLS_CONTEXTS.get(ts.typed_config.type_url)
        if cls is None or PEER_EXCHANGE_ALPN.encode() not in ts.typed_config.value:
            return
        ctx = cls()
        ts.typed_config.Unpack(ctx)
        alpn = ctx.common_tls_context.alpn_protocols
        kept = [p for p in alpn if p != PEER_EXCHANGE_ALPN]
        if len(kept) != len(alpn):
            self.dropped[ALPN_DROPPED] += len(alpn) - len(kept)
            del alpn[:]
            alpn.extend(kept)
            ts.typed_config.Pack(ctx)

    def chain(self, fc: listener_components_pb2.FilterChain) -> None:
        if fc.HasField("transport_socket"):
            self.transport_socket(fc.transport_socket)
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
        if c.HasField("transport_socket"):
            self.transport_socket(c.transport_socket)
        for match in c.transport_socket_matches:
            self.transport_socket(match.transport_socket)
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
    """The response with istio-proxy-only filters and the exchange ALPN removed, and how many of each were dropped.

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
