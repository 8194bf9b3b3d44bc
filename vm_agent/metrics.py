"""The agent's own Prometheus registry.

Every package defines its metrics at module level against ``REGISTRY`` (names start with
``vm_agent_``); the status server merges this registry with Envoy's stats on /stats/prometheus.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, ProcessCollector

REGISTRY = CollectorRegistry(auto_describe=True)
ProcessCollector(namespace="vm_agent", registry=REGISTRY)
