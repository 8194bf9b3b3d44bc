"""How to tell, without decoding anything, that an LDS/CDS response holds what only istio-proxy understands.

Light on purpose: the xDS proxy checks every response with ``mentions_istio_proxy`` and loads the rewrite (and
the Envoy protos it decodes with) only for a response that needs it.
"""

from __future__ import annotations

LISTENER_TYPE_URL = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

TCP_EXCHANGE = "envoy.tcp.metadataexchange.config.MetadataExchange"
HTTP_EXCHANGE = "io.istio.http.peer_metadata.Config"
ALPN = "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
STATS = "stats.PluginConfig"
ISTIO_PROXY_ONLY = frozenset({TCP_EXCHANGE, HTTP_EXCHANGE, ALPN, STATS})
"""Extensions only istio-proxy has, as istiod names their config types (TypedStruct-wrapped or not)."""
PEER_EXCHANGE_ALPN = "istio-peer-exchange"
"""The ALPN that tells a peer's exchange filter to write its preamble (istiod: ``ALPNInMeshWithMxc``)."""
ALPN_DROPPED = f"alpn {PEER_EXCHANGE_ALPN}"
"""How a removed ALPN entry is counted next to the replaced filters."""
MARKERS = (*(name.encode() for name in ISTIO_PROXY_ONLY), PEER_EXCHANGE_ALPN.encode())
"""The byte strings any of those leaves in a serialized message."""


def mentions_istio_proxy(message: bytes, type_url: str) -> bool:
    """Whether a response may hold an istio-proxy-only filter or the exchange ALPN (a byte search, no decoding)."""
    return type_url in (LISTENER_TYPE_URL, CLUSTER_TYPE_URL) and any(m in message for m in MARKERS)
