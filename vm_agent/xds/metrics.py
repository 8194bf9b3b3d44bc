"""The ADS proxy's metrics (``vm_agent_xds_*`` on the agent's registry)."""

from __future__ import annotations

from vm_agent.metrics import REGISTRY, Counter, Gauge

STREAMS = Counter("vm_agent_xds_streams", "ADS streams Envoy opened, by flavour", ["flavour"], registry=REGISTRY)
ACTIVE = Gauge("vm_agent_xds_active_streams", "ADS streams currently proxied", registry=REGISTRY)
UPSTREAM_UP = Gauge(
    "vm_agent_xds_upstream_connected",
    "1 while an upstream stream to the discovery server has delivered a response and not ended",
    registry=REGISTRY,
)
DISCONNECTS = Counter(
    "vm_agent_xds_disconnects",
    "Proxied streams that ended, by who ended them, the gRPC status and its class (graceful, expected, unexpected)",
    ["side", "code", "reason"],
    registry=REGISTRY,
)
RESPONSES = Counter(
    "vm_agent_xds_responses",
    "Responses from the discovery server, by type and what the proxy did (forwarded, consumed, dropped)",
    ["type_url", "action"],
    registry=REGISTRY,
)
RESPONSE_BYTES = Counter(
    "vm_agent_xds_response_bytes", "Bytes of responses received from the discovery server", registry=REGISTRY
)
ACKS = Counter(
    "vm_agent_xds_acks",
    "ACKs and NACKs sent upstream, by type, result and sender (envoy or agent)",
    ["type_url", "result", "sender"],
    registry=REGISTRY,
)
LAST_RESPONSE = Gauge(
    "vm_agent_xds_last_response_timestamp_seconds",
    "Unix time of the last response of each type",
    ["type_url"],
    registry=REGISTRY,
)
DIALS = Counter(
    "vm_agent_xds_upstream_dials",
    "Upstream streams opened to the discovery server, by how the previous one went (first, worked, failed)",
    ["after"],
    registry=REGISTRY,
)
DIAL_BACKOFF = Gauge(
    "vm_agent_xds_upstream_backoff_seconds",
    "Wait imposed on the next upstream dial after a failed one (0 after a stream that worked)",
    registry=REGISTRY,
)
