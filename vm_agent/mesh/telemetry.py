"""What a default istiod adds to a sidecar's configuration for Istio's telemetry, for the local mesh to push too.

istiod (helm's default ``defaultProviders.metrics: [prometheus]``) puts ``istio.metadata_exchange``,
``istio.alpn`` and ``istio.stats`` into HTTP connection managers, the TCP exchange and ``istio.stats`` into TCP
chains and the TCP exchange onto outbound clusters; clusters carry ``istio.services`` metadata and EDS endpoints
``istio.workload``. The local mesh pushes the same, so the agent's rewrite for stock Envoy
(``vm_agent.telemetry.rewrite``) runs in the demo and the fast suite exactly as it does against istiod. The
configs are TypedStruct-wrapped, as istiod wraps the exchange (the mesh has no descriptors for Istio's types).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from udpa.type.v1 import typed_struct_pb2  # noqa: F401  (registers the TypedStruct "@type")

from vm_agent.mesh.services import Endpoint

_TS = "type.googleapis.com/udpa.type.v1.TypedStruct"
_PEER_METADATA = "type.googleapis.com/io.istio.http.peer_metadata.Config"
_TCP_EXCHANGE = "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange"
_ALPN = "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig"
_STATS = "type.googleapis.com/stats.PluginConfig"
_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_TCP_PROXY = "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy"
_CANONICAL_NAME = ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app")
_CANONICAL_REVISION = ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version")


def _filter(name: str, type_url: str, value: Mapping[str, Any]) -> dict[str, Any]:
    return {"name": name, "typed_config": {"@type": _TS, "type_url": type_url, "value": dict(value)}}


def _stats(inbound: bool) -> dict[str, Any]:
    # istiod turns the Host header fallback off for inbound listeners.
    return _filter("istio.stats", _STATS, {"disable_host_header_fallback": True} if inbound else {})


def _tcp_exchange() -> dict[str, Any]:
    return _filter(
        "istio.metadata_exchange", _TCP_EXCHANGE, {"protocol": "istio-peer-exchange", "enable_discovery": True}
    )


def http_filters(inbound: bool) -> list[dict[str, Any]]:
    """The filters istiod puts before the router of a sidecar's HTTP connection manager."""
    side = "downstream" if inbound else "upstream"
    exchange = _filter(
        "istio.metadata_exchange",
        _PEER_METADATA,
        {
            f"{side}_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}],
            f"{side}_propagation": [{"istio_headers": {}}],
        },
    )
    if inbound:
        return [exchange, _stats(True)]
    alpn = _filter(
        "istio.alpn",
        _ALPN,
        {
            "alpn_override": [
                {"alpn_override": ["istio-http/1.0", "istio", "http/1.0"]},
                {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio", "http/1.1"]},
                {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio", "h2"]},
            ]
        },
    )
    return [exchange, alpn, _stats(False)]


def decorate_listener(listener: dict[str, Any]) -> None:
    """Add istiod's telemetry filters to every chain of a generated listener (in place)."""
    inbound = listener.get("traffic_direction") == "INBOUND"
    for chain in listener.get("filter_chains", []):
        filters = chain.get("filters", [])
        if not filters:
            continue
        last = filters[-1]["typed_config"]
        if last["@type"] == _HCM:
            last["http_filters"] = [*http_filters(inbound), *last.get("http_filters", [])]
        elif last["@type"] == _TCP_PROXY:
            chain["filters"] = [*([_tcp_exchange()] if inbound else []), _stats(inbound), *filters]


def decorate_cluster(cluster: dict[str, Any], *, host: str, name: str, namespace: str, mesh: bool) -> None:
    """istiod's ``istio.services`` metadata, and the TCP exchange on clusters that reach mesh workloads."""
    cluster.setdefault("metadata", {}).setdefault("filter_metadata", {})["istio"] = {
        "services": [{"host": host, "name": name, "namespace": namespace}]
    }
    if mesh:
        cluster["filters"] = [_tcp_exchange()]


def endpoint_workload(ep: Endpoint, cluster_id: str) -> str:
    """istiod's ``istio.workload`` endpoint metadata: workload;namespace;canonical name;revision;cluster."""
    canonical = next((ep.labels[k] for k in _CANONICAL_NAME if ep.labels.get(k)), ep.workload)
    revision = next((ep.labels[k] for k in _CANONICAL_REVISION if ep.labels.get(k)), "latest")
    return ";".join((ep.workload, ep.namespace, canonical, "" if revision == "latest" else revision, cluster_id))
