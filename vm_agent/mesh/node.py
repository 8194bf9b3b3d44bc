"""What istiod reads from a proxy's first ADS request: the node id and the node metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.json_format import MessageToDict

from vm_agent.mesh.model import is_ip

NODE_TYPES = ("sidecar", "router", "waypoint", "ztunnel")


class NodeError(ValueError):
    """The node id or metadata cannot be used (InvalidArgument at the gRPC layer)."""


def _truthy(value: Any) -> bool:
    # istiod's StringBool: the JSON string "true" (strconv.ParseBool also takes 1/t/T/TRUE/True).
    return str(value) in ("1", "t", "T", "true", "TRUE", "True")


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    node_type: str
    ips: tuple[str, ...]
    proxy_id: str
    dns_domain: str
    namespace: str
    metadata: dict[str, Any] = field(default_factory=dict)
    cluster: str = ""
    locality: str = ""

    def meta_str(self, key: str) -> str:
        value = self.metadata.get(key)
        return value if isinstance(value, str) else ""

    @property
    def service_account(self) -> str:
        return self.meta_str("SERVICE_ACCOUNT")

    @property
    def cluster_id(self) -> str:
        return self.meta_str("CLUSTER_ID")

    @property
    def network(self) -> str:
        return self.meta_str("NETWORK")

    @property
    def auto_register_group(self) -> str:
        return self.meta_str("AUTO_REGISTER_GROUP")

    @property
    def workload_entry(self) -> str:
        return self.meta_str("WORKLOAD_ENTRY")

    @property
    def dns_capture(self) -> bool:
        return _truthy(self.metadata.get("DNS_CAPTURE", ""))

    @property
    def interception_mode(self) -> str:
        return self.meta_str("INTERCEPTION_MODE") or "REDIRECT"

    @property
    def labels(self) -> dict[str, str]:
        raw = self.metadata.get("LABELS")
        if isinstance(raw, dict):
            return {str(k): str(v) for k, v in raw.items()}
        return {}

    @property
    def proxy_config(self) -> dict[str, Any]:
        raw = self.metadata.get("PROXY_CONFIG")
        return raw if isinstance(raw, dict) else {}


def parse_node(node: Any) -> NodeInfo:
    """``node`` is an ``envoy.config.core.v3.Node``; istiod's rules (pilot/pkg/model ParseServiceNodeWithMetadata)."""
    node_id: str = node.id
    if not node_id:
        raise NodeError("node.id: missing on the first request, expected type~ip~id~domain")
    parts = node_id.split("~")
    if len(parts) != 4:
        raise NodeError(f"node.id {node_id!r}: expected 4 parts separated by '~' (type~ip~id~domain)")
    if parts[0] not in NODE_TYPES:
        raise NodeError(f"node.id {node_id!r}: type {parts[0]!r} is not one of {', '.join(NODE_TYPES)}")
    metadata: dict[str, Any] = MessageToDict(node.metadata) if node.HasField("metadata") else {}
    ips: list[str] = []
    raw_ips = metadata.get("INSTANCE_IPS")
    if isinstance(raw_ips, str) and raw_ips:
        candidates = [p for p in raw_ips.split(",") if p]
        if all(is_ip(p) for p in candidates):
            ips = candidates
    if not ips:
        if not is_ip(parts[1]):
            raise NodeError(f"node.id {node_id!r}: {parts[1]!r} is not an IP address and INSTANCE_IPS gives none")
        ips = [parts[1]]
    namespace = metadata.get("NAMESPACE") if isinstance(metadata.get("NAMESPACE"), str) else ""
    if not namespace:
        namespace = parts[3].split(".")[0]
    # Labels arrive as a JSON object; some clients send them JSON-encoded in a string.
    if isinstance(metadata.get("LABELS"), str):
        try:
            metadata["LABELS"] = json.loads(metadata["LABELS"])
        except json.JSONDecodeError as e:
            raise NodeError("node.metadata.LABELS: expected a JSON object") from e
    locality = ""
    if node.HasField("locality"):
        loc = node.locality
        locality = "/".join(p for p in (loc.region, loc.zone, loc.sub_zone) if p)
    return NodeInfo(
        node_id=node_id,
        node_type=parts[0],
        ips=tuple(ips),
        proxy_id=parts[2],
        dns_domain=parts[3],
        namespace=str(namespace),
        metadata=metadata,
        cluster=node.cluster,
        locality=locality,
    )
