"""The node istiod sees: id, cluster, metadata and locality, derived as pilot-agent derives them (§6).

The node type is ``sidecar``, or ``router`` for the gateway role (pilot-agent's ``proxy router``); everything
else is the same derivation, so a gateway's labels (``ISTIO_METAJSON_LABELS``), ``ROUTER_MODE`` and
``REQUESTED_NETWORK_VIEW`` (``ISTIO_META_*``) reach istiod exactly as pilot-agent sends them.
"""

from __future__ import annotations

import json
from typing import Any

from vm_agent import ISTIO_COMPAT_VERSION
from vm_agent.config.envreader import EnvReader
from vm_agent.config.model import Node, ProxyConfig

NODE_TYPES = {"sidecar": "sidecar", "gateway": "router"}
"""vm-agent role -> the node type in the node id."""


def build_node(
    env: EnvReader,
    proxy: ProxyConfig,
    *,
    role: str,
    instance_ips: tuple[str, ...],
    pod_name: str,
    namespace: str,
    service_account: str,
    pilot_san: str,
    envoy_status_port: int,
    envoy_prometheus_port: int,
) -> Node:
    dns_domain = env.get("VM_AGENT_DNS_DOMAIN") or f"{namespace}.svc.cluster.local"
    node_id = f"{NODE_TYPES[role]}~{instance_ips[0]}~{pod_name}.{namespace}~{dns_domain}"
    labels: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for k, v in proxy.proxy_metadata.items():
        if k.startswith("ISTIO_META_"):
            metadata[k[len("ISTIO_META_") :]] = v
    for k, v in sorted(env.env.items()):
        if k.startswith("ISTIO_META_"):
            metadata[k[len("ISTIO_META_") :]] = v
    for k, v in sorted(env.env.items()):
        if k.startswith("ISTIO_METAJSON_"):
            try:
                doc = json.loads(v) if v else {}
            except json.JSONDecodeError as err:
                env.problem(k, f"expected a JSON object, got invalid JSON ({err.msg})")
                continue
            if not isinstance(doc, dict):
                env.problem(k, f"expected a JSON object, got {type(doc).__name__}")
                continue
            # FAITHFUL quirk (§6.2): the object's keys land at the top level of the metadata.
            metadata.update(doc)
            if k == "ISTIO_METAJSON_LABELS":
                labels = {str(a): str(b) for a, b in doc.items()}
    if env.get("DNS_PROXY_ADDR"):
        metadata["DNS_PROXY_ADDR"] = env.get("DNS_PROXY_ADDR")
    hbone = env.bool("ISTIO_META_ENABLE_HBONE", False)
    peer_md = env.get("PEER_METADATA_DISCOVERY")
    proxy_json = dict(proxy.raw)
    if proxy.readiness_probe is not None:
        proxy_json["readinessProbe"] = proxy.readiness_probe.to_json()
    typed: dict[str, Any] = {
        "ISTIO_VERSION": ISTIO_COMPAT_VERSION,
        "INSTANCE_IPS": ",".join(instance_ips),
        "ENVOY_STATUS_PORT": envoy_status_port,
        "ENVOY_PROMETHEUS_PORT": envoy_prometheus_port,
        "METADATA_DISCOVERY": "true" if (peer_md and env.bool("PEER_METADATA_DISCOVERY", False)) or hbone else "false",
        "ENVOY_SKIP_DEPRECATED_LOGS": "true" if env.bool("ENVOY_SKIP_DEPRECATED_LOGS", True) else "false",
        "WORKLOAD_IDENTITY_SOCKET_FILE": "socket",
        "PROXY_CONFIG": proxy_json,
        "NAME": pod_name,
        "NAMESPACE": namespace,
        "SERVICE_ACCOUNT": service_account,
        "INTERCEPTION_MODE": proxy.interception_mode,
    }
    if labels:
        typed["LABELS"] = labels
        typed["STATIC_LABELS"] = labels
    if env.bool("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", False):
        typed["EXIT_ON_ZERO_ACTIVE_CONNECTIONS"] = "true"
    if proxy.control_plane_auth_policy == "MUTUAL_TLS":
        typed["PILOT_SAN"] = [pilot_san]
    metadata.update(typed)

    locality: dict[str, str] | None = None
    loc_label = labels.get("topology.istio.io/locality") or labels.get("istio-locality")
    if loc_label:
        parts = loc_label.split(".")
        names = ("region", "zone", "sub_zone")
        locality = {names[i]: p for i, p in enumerate(parts[:3]) if p}

    return Node(
        id=node_id,
        cluster=_service_cluster(proxy, labels, metadata, namespace),
        metadata=metadata,
        locality=locality,
        instance_ips=instance_ips,
        pod_name=pod_name,
        namespace=namespace,
        dns_domain=dns_domain,
    )


def _service_cluster(proxy: ProxyConfig, labels: dict[str, Any], metadata: dict[str, Any], namespace: str) -> str:
    if proxy.service_cluster and proxy.service_cluster != "istio-proxy":
        return proxy.service_cluster
    app = labels.get("app") or labels.get("app.kubernetes.io/name") or labels.get("service.istio.io/canonical-name")
    if app:
        return f"{app}.{namespace}"
    if metadata.get("WORKLOAD_NAME"):
        return f"{metadata['WORKLOAD_NAME']}.{namespace}"
    return f"istio-proxy.{namespace}"
