"""Make istiod's configuration fit stock Envoy: Istio's filters become stock ones, the exchange ALPN goes.

pilot-agent runs istio-proxy (Envoy plus Istio's extensions); vm-agent ships stock Envoy. A default istiod puts
four istio-proxy-only filter configs into CDS and LDS, and stock Envoy rejects a whole update for any one of them
(docs/interop.md). Each is replaced by what does its job with stock filters (``vm_agent.telemetry.filters``):

* ``istio.metadata_exchange`` in an HCM (``io.istio.http.peer_metadata.Config``) → the header exchange, outbound
  or inbound as istiod configured it;
* ``istio.alpn`` → the ALPN hint through ``set_filter_state``;
* ``istio.stats`` (HTTP or TCP) → stats access logs on the HCM or the chain's ``tcp_proxy``;
* ``istio.metadata_exchange`` as a network or cluster filter (the TCP exchange) → removed: stock Envoy cannot
  read a peer's preamble, so TCP peers are labelled from their certificates and endpoint metadata instead.

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
from collections.abc import Sequence
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2

# Imported for their descriptors: the stock filters' "@type"s must be known to parse them.
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from envoy.extensions.filters.http.header_to_metadata.v3 import header_to_metadata_pb2  # noqa: F401
from envoy.extensions.filters.http.set_filter_state.v3 import set_filter_state_pb2  # noqa: F401
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format, struct_pb2
from udpa.type.v1 import typed_struct_pb2 as udpa_typed_struct_pb2
from xds.type.v3 import typed_struct_pb2 as xds_typed_struct_pb2

from vm_agent.telemetry import filters
from vm_agent.telemetry.markers import (
    ALPN,
    ALPN_DROPPED,
    CLUSTER_TYPE_URL,
    HTTP_EXCHANGE,
    ISTIO_PROXY_ONLY,
    LISTENER_TYPE_URL,
    MARKERS,
    PEER_EXCHANGE_ALPN,
    STATS,
    TCP_EXCHANGE,
    mentions_istio_proxy,
)
from vm_agent.telemetry.native import NativeStats
from vm_agent.telemetry.peer import NodeExchange

_TLS_CONTEXTS = {
    f"type.googleapis.com/{cls.DESCRIPTOR.full_name}": cls
    for cls in (tls_pb2.UpstreamTlsContext, tls_pb2.DownstreamTlsContext)
}
_HCM = hcm_pb2.HttpConnectionManager.DESCRIPTOR.full_name
_TCP_PROXY = tcp_proxy_pb2.TcpProxy.DESCRIPTOR.full_name
_TYPED_STRUCTS = (xds_typed_struct_pb2.TypedStruct, udpa_typed_struct_pb2.TypedStruct)


def _typed_struct(any_: any_pb2.Any) -> tuple[str, struct_pb2.Struct | None]:
    name = any_.type_url.rsplit("/", 1)[-1]
    for cls in _TYPED_STRUCTS:
        if name == cls.DESCRIPTOR.full_name:
            ts = cls()
            any_.Unpack(ts)
            return str(ts.type_url).rsplit("/", 1)[-1], ts.value
    return name, None


def config_type(any_: any_pb2.Any) -> str:
    """A filter's real config type: istiod wraps out-of-tree extensions in a TypedStruct."""
    return _typed_struct(any_)[0]


_NOT_MESH_CLUSTERS = frozenset({"PassthroughCluster", "BlackHoleCluster", "InboundPassthroughCluster"})


def _in_mesh(c: cluster_pb2.Cluster) -> bool:
    """Whether istio-proxy would send the exchange headers to this cluster: not passthrough, not marked external
    or exchange-less by istiod (the same test istio-proxy makes per request, made once per cluster here)."""
    if c.name in _NOT_MESH_CLUSTERS:
        return False
    istio = c.metadata.filter_metadata.get("istio")
    if istio is None:
        return True
    return not any(k in istio.fields and istio.fields[k].bool_value for k in ("external", "disable_mx"))


def _downstream(config: struct_pb2.Struct | None) -> bool:
    """Whether an HTTP exchange config is istiod's inbound one (it discovers the downstream peer)."""
    return config is not None and any(k.startswith("downstream_") for k in config.fields)


def _only_cluster(hcm: hcm_pb2.HttpConnectionManager) -> str | None:
    """The one cluster every route of an inline route configuration sends to (istiod's inbound chains), else None."""
    if not hcm.HasField("route_config"):
        return None
    names = set()
    for vh in hcm.route_config.virtual_hosts:
        for r in vh.routes:
            if r.WhichOneof("action") != "route" or r.route.WhichOneof("cluster_specifier") != "cluster":
                return None
            names.add(r.route.cluster)
    return names.pop() if len(names) == 1 else None


def _http_filters(dicts: Sequence[dict[str, Any]]) -> list[hcm_pb2.HttpFilter]:
    return [json_format.ParseDict(d, hcm_pb2.HttpFilter()) for d in dicts]


def _access_logs(dicts: Sequence[dict[str, Any]]) -> list[accesslog_pb2.AccessLog]:
    return [json_format.ParseDict(d, accesslog_pb2.AccessLog()) for d in dicts]


class _Rewriter:
    def __init__(self, node: NodeExchange | None, native: NativeStats | None = None) -> None:
        self.node = node
        self.native = native if node is not None else None
        self.counts: Counter[str] = Counter()

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
            self.counts[ALPN_DROPPED] += len(alpn) - len(kept)
            del alpn[:]
            alpn.extend(kept)
            ts.typed_config.Pack(ctx)

    def http_filters(
        self, hcm: hcm_pb2.HttpConnectionManager, reporter: str, *, mtls: bool, alpn_hint: bool = True
    ) -> bool:
        kinds = [_typed_struct(h.typed_config) for h in hcm.http_filters]
        if not any(kind in ISTIO_PROXY_ONLY for kind, _ in kinds):
            return False
        self.counts.update(kind for kind, _ in kinds if kind in ISTIO_PROXY_ONLY)
        out: list[hcm_pb2.HttpFilter] = []
        node = self.node
        inbound_exchange = any(kind == HTTP_EXCHANGE and _downstream(value) for kind, value in kinds)
        stats = node is not None and any(kind == STATS for kind, _ in kinds)
        # The native filter (telemetry.native) counts the requests and, outbound, takes the peer's answer; it goes
        # first so it sees the caller's headers before the router removes them.
        native = self.native if stats else None
        if native is not None:
            out += _http_filters([native.http_filter(reporter)])
        # Else, inbound, the request's facts are formatted once into filter state, first thing, so every request
        # that reaches the filters has them (an RBAC denial included).
        capture = native is None and stats and reporter == "destination"
        if capture:
            out += _http_filters([filters.request_capture(exchange=inbound_exchange)])
        for h, (kind, value) in zip(hcm.http_filters, kinds, strict=True):
            if kind not in ISTIO_PROXY_ONLY:
                out.append(h)
            elif node is None:
                continue
            elif kind == HTTP_EXCHANGE and _downstream(value):
                out += self._inbound_exchange(hcm, node, mtls=mtls)
            elif kind == HTTP_EXCHANGE:
                if native is None:
                    out += _http_filters(filters.outbound_exchange())
            elif kind == ALPN and alpn_hint:
                out += _http_filters([filters.alpn_hint()])
            elif kind == STATS and native is None:
                only = _only_cluster(hcm) if capture else None
                stats_log = filters.http_stats(reporter, captured=capture, cluster=only)
                hcm.access_log.extend(_access_logs([stats_log]))
        del hcm.http_filters[:]
        hcm.http_filters.extend(out)
        return True

    def _inbound_exchange(
        self, hcm: hcm_pb2.HttpConnectionManager, node: NodeExchange, *, mtls: bool
    ) -> list[hcm_pb2.HttpFilter]:
        if not hcm.HasField("route_config"):
            return _http_filters(filters.inbound_exchange(node.node_id, node.header_value, mtls=mtls))
        # Where istiod inlines the route configuration (inbound chains), the router does it for less than a filter
        # costs per request: it removes the caller's headers and adds our answer for mesh callers.
        if mtls:
            hcm.route_config.response_headers_to_add.extend(
                json_format.ParseDict(h, base_pb2.HeaderValueOption())
                for h in filters.answer_headers(node.node_id, node.header_value)
            )
        hcm.route_config.request_headers_to_remove.extend(filters.PEER_HEADERS)
        return []

    def chain(self, fc: listener_components_pb2.FilterChain, reporter: str, *, alpn_hint: bool = True) -> None:
        # istiod's inbound chains for mesh callers terminate mutual TLS; plaintext chains serve anyone.
        mtls = fc.transport_socket.typed_config.type_url.endswith(tls_pb2.DownstreamTlsContext.DESCRIPTOR.full_name)
        if fc.HasField("transport_socket"):
            self.transport_socket(fc.transport_socket)
        kept: list[listener_components_pb2.Filter] = []
        stats = False
        for f in fc.filters:
            kind = config_type(f.typed_config)
            if kind in ISTIO_PROXY_ONLY:
                self.counts[kind] += 1
                stats = stats or kind == STATS
                continue
            kept.append(f)
            if kind == _HCM:
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                if self.http_filters(hcm, reporter, mtls=mtls, alpn_hint=alpn_hint):
                    f.typed_config.Pack(hcm)
            elif kind == _TCP_PROXY and stats and self.node is not None:
                tcp = tcp_proxy_pb2.TcpProxy()
                f.typed_config.Unpack(tcp)
                tcp.access_log.extend(_access_logs(filters.tcp_stats(reporter)))
                tcp.access_log_options.flush_access_log_on_connected = True
                f.typed_config.Pack(tcp)
        if len(kept) != len(fc.filters):
            del fc.filters[:]
            fc.filters.extend(kept)

    def listener(self, lis: listener_pb2.Listener) -> None:
        # istio-proxy's stats filter takes its reporter from the listener's direction.
        reporter = "destination" if lis.traffic_direction == base_pb2.INBOUND else "source"
        outbound = lis.traffic_direction == base_pb2.OUTBOUND
        for fc in lis.filter_chains:
            # The hint only steers a peer whose port sniffs the protocol, and a port sniffs on both ends: istiod
            # gives a sniffing port's outbound HTTP chain the ALPNs the HTTP inspector finds, a declared HTTP
            # port's chain none, and the peer's declared HTTP chains accept "istio" as it is. A set_filter_state
            # per request saved there (gateways, whose routes reach every kind of port, keep it).
            hint = not outbound or bool(fc.filter_chain_match.application_protocols)
            self.chain(fc, reporter, alpn_hint=hint)
        if lis.HasField("default_filter_chain"):
            self.chain(lis.default_filter_chain, reporter, alpn_hint=not outbound)

    def cluster(self, c: cluster_pb2.Cluster) -> None:
        if c.HasField("transport_socket"):
            self.transport_socket(c.transport_socket)
        for match in c.transport_socket_matches:
            self.transport_socket(match.transport_socket)
        kept = []
        exchange = False
        for f in c.filters:
            kind = config_type(f.typed_config)
            if kind in ISTIO_PROXY_ONLY:
                self.counts[kind] += 1
                exchange = exchange or kind == TCP_EXCHANGE
            else:
                kept.append(f)
        if len(kept) != len(c.filters):
            del c.filters[:]
            c.filters.extend(kept)
        if exchange and self.node is not None and _in_mesh(c):
            self._propagate(c, self.node)

    def _propagate(self, c: cluster_pb2.Cluster, node: NodeExchange) -> None:
        """Our exchange headers on every request to this cluster, as its upstream HTTP filters (a cluster that only
        carries TCP never runs them)."""
        key = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        opts = http_protocol_options_pb2.HttpProtocolOptions()
        if key in c.typed_extension_protocol_options:
            c.typed_extension_protocol_options[key].Unpack(opts)
        else:
            opts.explicit_http_config.http_protocol_options.SetInParent()  # Envoy's default codec, spelled out
        if opts.http_filters:
            return  # someone else's upstream filters: leave them as they are
        opts.http_filters.extend(_http_filters(filters.upstream_exchange(node.node_id, node.header_value)))
        c.typed_extension_protocol_options[key].Pack(opts)

    def resource(self, any_: any_pb2.Any) -> None:
        if not any(m in any_.value for m in MARKERS):
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


def for_stock_envoy(
    message: bytes, type_url: str, *, delta: bool, node: NodeExchange | None, native: NativeStats | None = None
) -> tuple[bytes, dict[str, int]]:
    """The response with Istio's filters replaced by stock ones and the exchange ALPN removed, and how many of
    each were rewritten. ``node=None`` only removes (no exchange, ALPN hint or metrics); ``native``: the native
    stats filter, used for HTTP metrics in place of the stats access log.

    Returns the original bytes untouched when the response is not LDS/CDS or holds none of them.
    """
    if not mentions_istio_proxy(message, type_url):
        return message, {}
    rewriter = _Rewriter(node, native)
    if delta:
        dresp = discovery_pb2.DeltaDiscoveryResponse.FromString(message)
        for res in dresp.resources:
            if res.HasField("resource"):
                rewriter.resource(res.resource)
        out = dresp.SerializeToString()
    else:
        resp = discovery_pb2.DiscoveryResponse.FromString(message)
        for any_ in resp.resources:
            rewriter.resource(any_)
        out = resp.SerializeToString()
    if not rewriter.counts:
        return message, {}
    return out, dict(rewriter.counts)


def strip_istio_proxy_filters(message: bytes, type_url: str, *, delta: bool) -> tuple[bytes, dict[str, int]]:
    """Only remove istio-proxy's filters and the exchange ALPN (what stock Envoy needs to accept the rest)."""
    return for_stock_envoy(message, type_url, delta=delta, node=None)
