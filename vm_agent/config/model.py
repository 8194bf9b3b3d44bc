"""The agent's effective configuration: one immutable object built once at start by ``load()``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm_agent.config.probe import ReadinessProbe
from vm_agent.config.problems import Problem


@dataclass(frozen=True)
class Paths:
    root: Path
    cluster_env: Path
    sidecar_env: Path
    mesh_config: Path
    root_cert: Path
    token: Path
    hosts: Path
    resolv_conf: Path
    state_dir: Path
    proxy_config_dir: Path  # ProxyConfig.configPath: envoy-rev.json and the XDS socket
    xds_socket: Path
    sds_socket: Path
    output_certs: Path | None  # OUTPUT_CERTS, only when set explicitly


@dataclass(frozen=True)
class ProxyConfig:
    """ProxyConfig after defaults, the mesh file's defaultConfig and PROXY_CONFIG (§3)."""

    raw: Mapping[str, Any]  # the effective ProxyConfig as protojson (camelCase), sent as node metadata
    config_path: str
    binary_path: str
    service_cluster: str
    drain_duration_s: float
    termination_drain_duration_s: float
    discovery_address: str
    proxy_admin_port: int
    status_port: int
    control_plane_auth_policy: str
    interception_mode: str
    concurrency: int | None
    stat_name_length: int
    proxy_metadata: Mapping[str, str]
    runtime_values: Mapping[str, str]
    readiness_probe: ReadinessProbe | None


@dataclass(frozen=True)
class Node:
    id: str
    cluster: str
    metadata: Mapping[str, Any]
    locality: Mapping[str, str] | None
    instance_ips: tuple[str, ...]
    pod_name: str
    namespace: str
    dns_domain: str

    @property
    def ipv6_only(self) -> bool:
        return bool(self.instance_ips) and all(":" in ip for ip in self.instance_ips)


@dataclass(frozen=True)
class Upstream:
    """How to reach istiod for one purpose (discovery or CA)."""

    address: str  # as configured, host:port
    host: str
    port: int
    dial_target: str  # host:port actually dialed (host resolved through the hosts file when listed there)
    server_name: str  # TLS name verified (§4.2)
    plaintext: bool
    root_cert: Path
    extra_metadata: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class IdentityConfig:
    trust_domain: str
    namespace: str
    service_account: str
    cluster_id: str
    key_algorithm: str  # RSA | ECDSA
    rsa_key_size: int
    ec_curve: str
    pkcs8: bool
    secret_ttl_s: int
    grace_ratio: float
    grace_jitter: float
    cert_signer: str

    @property
    def spiffe_id(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


@dataclass(frozen=True)
class DnsConfig:
    enabled: bool
    capture: bool
    listen: tuple[tuple[str, int], ...]
    upstreams: tuple[tuple[str, int], ...]
    search_domains: tuple[str, ...]
    proxy_domain: str
    forward_timeout_s: float
    forward_parallel: bool


@dataclass(frozen=True)
class CaptureConfig:
    enabled: bool  # false with ISTIO_CUSTOM_IP_TABLES=true
    interception_mode: str
    inbound_ports: str
    local_exclude_ports: tuple[int, ...]
    service_cidr: str
    service_exclude_cidr: tuple[str, ...]
    outbound_ports: tuple[int, ...]
    outbound_exclude_ports: tuple[int, ...]
    exclude_interfaces: tuple[str, ...]
    proxy_uid: int
    proxy_gid: int
    dns_capture: bool
    capture_all_dns: bool


@dataclass(frozen=True)
class AgentConfig:
    status_host: str
    envoy_binary: str | None  # None: the Envoy the package ships, else envoy on PATH
    envoy_status_port: int
    envoy_prometheus_port: int
    delta_xds: bool
    health_heartbeat_s: float
    auto_register_group: str
    rewrite_probe_localhost: bool
    proxy_log_level: str
    proxy_component_log_level: str | None
    metrics_localhost_only: bool
    envoy_group: str | None = None  # group Envoy runs as: the SDS socket is handed to it (0660)
    manage_capture: bool = False  # an agent running as root applies and removes the capture rules itself
    endpoint_hold_s: float = 45.0  # after a lost upstream: how long Envoy keeps endpoints istiod's first updates empty
    role: str = "sidecar"  # or "gateway": node type router, no capture, no DNS proxy, no probe (config/role.py)
    native_stats: bool = True  # VM_AGENT_NATIVE_STATS: HTTP requests counted natively (telemetry/native)


@dataclass(frozen=True)
class Config:
    paths: Paths
    env: Mapping[str, str]  # cluster.env overlaid with the process environment
    proxy: ProxyConfig
    node: Node
    discovery: Upstream
    ca: Upstream
    identity: IdentityConfig
    dns: DnsConfig
    capture: CaptureConfig
    agent: AgentConfig
    hosts: Mapping[str, tuple[str, ...]]
    problems: tuple[Problem, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The effective configuration for ``vm-agent check --json``; never contains the token or a key."""
        probe = self.proxy.readiness_probe
        return {
            "role": self.agent.role,
            "node_id": self.node.id,
            "cluster": self.node.cluster,
            "namespace": self.identity.namespace,
            "service_account": self.identity.service_account,
            "trust_domain": self.identity.trust_domain,
            "spiffe_id": self.identity.spiffe_id,
            "cluster_id": self.identity.cluster_id,
            "discovery_address": self.discovery.address,
            "discovery_dial_target": self.discovery.dial_target,
            "discovery_server_name": self.discovery.server_name,
            "ca_address": self.ca.address,
            "ca_dial_target": self.ca.dial_target,
            "ca_server_name": self.ca.server_name,
            "dns_capture": self.dns.capture,
            "dns": {
                "enabled": self.dns.enabled,
                "listen": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in self.dns.listen],
                "upstreams": [h for h, _ in self.dns.upstreams],
                "search_domains": list(self.dns.search_domains),
            },
            "auto_register_group": self.agent.auto_register_group,
            "instance_ips": list(self.node.instance_ips),
            "readiness_probe": probe.to_json() if probe else None,
            "capture": {
                "enabled": self.capture.enabled,
                "inbound_ports": self.capture.inbound_ports,
                "local_exclude_ports": list(self.capture.local_exclude_ports),
                "service_cidr": self.capture.service_cidr,
            },
            "paths": {
                "cluster_env": str(self.paths.cluster_env),
                "mesh_config": str(self.paths.mesh_config),
                "root_cert": str(self.paths.root_cert),
                "token": str(self.paths.token),
                "hosts": str(self.paths.hosts),
                "resolv_conf": str(self.paths.resolv_conf),
                "state_dir": str(self.paths.state_dir),
                "xds_socket": str(self.paths.xds_socket),
                "sds_socket": str(self.paths.sds_socket),
            },
            "proxy_config": dict(self.proxy.raw),
            "node_metadata": dict(self.node.metadata),
            "problems": [str(p) for p in self.problems],
        }
