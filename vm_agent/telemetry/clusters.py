"""What the agent keeps from CDS for Istio's metrics: each cluster's services, by cluster name.

istio-proxy reads ``destination_service*`` from the cluster's ``istio`` metadata (``services``: host, name,
namespace). Stock Envoy can print that list into a stat tag only as JSON, and every stat of every request formats
its tags anew: that JSON was the largest single cost of the metrics (``bench/results/telemetry.md``). The xDS
proxy sees every cluster once per update instead, so the raw tag carries the cluster's name only and the agent
looks the services up here when Prometheus scrapes.

A cluster that leaves CDS stays known (up to ``limit`` names, oldest forgotten first): Envoy keeps its series
after the cluster is gone, and they must keep their labels.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

SERVICES_MARKER = b"services"
"""istiod's ``istio`` metadata key; a CDS response without these bytes names no services and is not decoded."""


def decode_clusters(message: bytes, *, delta: bool) -> tuple[bool, list[str], list[Any]]:
    """A CDS response as (state of the world?, removed cluster names, the clusters it carries)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    if delta:
        dresp = discovery_pb2.DeltaDiscoveryResponse.FromString(message)
        anys = [r.resource for r in dresp.resources if r.HasField("resource")]
        removed = list(dresp.removed_resources)
    else:
        anys = list(discovery_pb2.DiscoveryResponse.FromString(message).resources)
        removed = []
    return not delta, removed, [cluster_pb2.Cluster.FromString(a.value) for a in anys]


def _services_json(cluster: Any) -> str | None:
    istio = cluster.metadata.filter_metadata.get("istio")
    if istio is None or "services" not in istio.fields:
        return None
    services = []
    for value in istio.fields["services"].list_value.values:
        fields = value.struct_value.fields
        services.append({k: fields[k].string_value for k in sorted(fields) if fields[k].HasField("string_value")})
    return json.dumps(services, separators=(",", ":"))


class ClusterServices:
    """Cluster name → its ``istio`` services as JSON (what ``%CLUSTER_METADATA(istio:services)%`` would print)."""

    def __init__(self, limit: int = 50_000) -> None:
        self._limit = limit
        self._by_name: OrderedDict[str, str] = OrderedDict()

    def learn(self, clusters: list[Any]) -> None:
        for cluster in clusters:
            services = _services_json(cluster)
            if services is None:
                self._by_name.pop(cluster.name, None)
                continue
            self._by_name[cluster.name] = services
            self._by_name.move_to_end(cluster.name)
        while len(self._by_name) > self._limit:
            self._by_name.popitem(last=False)

    def __call__(self, cluster_name: str) -> str:
        return self._by_name.get(cluster_name, "")

    def __len__(self) -> int:
        return len(self._by_name)
