"""Istio's peer metadata exchange and standard metrics for a VM running stock Envoy.

* ``peer``: the ``x-envoy-peer-metadata`` value of a workload, both ways.
* ``filters``: the stock Envoy filters that do the exchange, the ALPN hint and the counting.
* ``rewrite``: istiod's istio-proxy-only filters → those stock filters; the exchange ALPN removed.
* ``xds``: the xDS proxy's hook; ``detect``: does the Envoy binary have Istio's filters already?
* ``metrics``: Envoy's raw series → Istio's metric names and labels on the agent's ``/stats/prometheus``.
"""

from typing import Any

from vm_agent.telemetry.metrics import IstioMetrics, LocalWorkload
from vm_agent.telemetry.peer import NodeExchange, Workload, decode_header, header_value, workload_from_metadata
from vm_agent.telemetry.xds import StockEnvoyAdapter


def __getattr__(name: str) -> Any:
    # The rewrite loads Envoy's listener, cluster and filter protos: only when a response needs it.
    if name == "for_stock_envoy":
        from vm_agent.telemetry.rewrite import for_stock_envoy

        return for_stock_envoy
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "IstioMetrics",
    "LocalWorkload",
    "NodeExchange",
    "StockEnvoyAdapter",
    "Workload",
    "decode_header",
    "for_stock_envoy",
    "header_value",
    "workload_from_metadata",
]
