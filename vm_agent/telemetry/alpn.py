"""Where the ALPN hint must not go: routes to clusters istiod marks ``istio.alpn_override: "false"``.

istio-proxy's ``istio.alpn`` filter sets the hint (``istio-http/1.1`` ...) per request unless the request's cluster
carries that marker, which istiod puts on clusters with the user's own TLS (DestinationRule SIMPLE or MUTUAL,
``AddALPNOverrideToMetadata``): their server must see the application's real ALPN. Stock Envoy can only make that
test per request with a CEL expression, which cost more than the rest of the exchange together. So the hint is a
constant (``filters.alpn_hint``) and the test is made once per update instead: the clusters with the marker are
learnt from CDS, and the routes to them (RDS) get the filter disabled (``typed_per_filter_config``). Responses are
decoded only when they can matter (a CDS that names the marker, an RDS that names one of those clusters).
"""

from __future__ import annotations

from typing import Any

from vm_agent.telemetry.clusters import decode_clusters

CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_TYPE_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
ALPN_FILTER = "istio.alpn"
_MARKER = b"alpn_override"


def _overrides_off(cluster: Any) -> bool:
    istio = cluster.metadata.filter_metadata.get("istio")
    return (
        istio is not None and "alpn_override" in istio.fields and istio.fields["alpn_override"].string_value == "false"
    )


class AlpnExceptions:
    """The clusters (by name) Envoy must not send the ALPN hint to, kept across responses."""

    def __init__(self) -> None:
        self.clusters: set[str] = set()

    def learn(self, message: bytes, *, delta: bool) -> None:
        """A CDS response: which of its clusters carry the marker."""
        if self.wants(message):
            self.learn_clusters(*decode_clusters(message, delta=delta))

    def wants(self, message: bytes) -> bool:
        """Whether this CDS response can change the set (it names the marker, or there is a set to shrink)."""
        return _MARKER in message or bool(self.clusters)

    def learn_clusters(self, state_of_world: bool, removed: list[str], clusters: list[Any]) -> None:
        if state_of_world:
            self.clusters.clear()  # this response is every cluster
        self.clusters.difference_update(removed)
        for cluster in clusters:
            if _overrides_off(cluster):
                self.clusters.add(cluster.name)
            else:
                self.clusters.discard(cluster.name)

    def apply(self, message: bytes, *, delta: bool) -> bytes:
        """An RDS response with the hint turned off on every route to one of those clusters."""
        if not self.clusters or not any(name.encode() in message for name in self.clusters):
            return message
        from envoy.config.route.v3 import route_components_pb2, route_pb2
        from envoy.service.discovery.v3 import discovery_pb2

        off = route_components_pb2.FilterConfig(disabled=True)
        resp: Any = (discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse).FromString(
            message
        )
        anys = [r.resource for r in resp.resources if r.HasField("resource")] if delta else list(resp.resources)
        changed = False
        for any_ in anys:
            rc = route_pb2.RouteConfiguration.FromString(any_.value)
            touched = False
            for vh in rc.virtual_hosts:
                for route in vh.routes:
                    action = route.route
                    targets = {action.cluster} | {w.name for w in action.weighted_clusters.clusters}
                    if targets & self.clusters:
                        route.typed_per_filter_config[ALPN_FILTER].Pack(off)
                        touched = True
            if touched:
                any_.value = rc.SerializeToString()
                changed = True
        return bytes(resp.SerializeToString()) if changed else message
