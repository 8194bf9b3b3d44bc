"""Envoy bootstrap and command line, built the way pilot-agent builds them (istio-agent.md §6, §7.1).

istiod reads ``node`` (id, cluster, locality, metadata) from the first xDS request, and the agent's
readiness and drain logic read ``server.*``, ``listener_manager.*`` and ``cluster_manager.*`` stats, so
those parts must match Istio's template; everything else follows it so operators see familiar names.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vm_agent.files import atomic_write

BOOTSTRAP_FILE = "envoy-rev.json"

# Istio's envoy_bootstrap.json defaults; ProxyConfig runtimeValues are layered over these.
DEFAULT_RUNTIME: Mapping[str, Any] = {
    "re2.max_program_size.error_level": "32768",
    "envoy.deprecated_features:envoy.config.listener.v3.Listener.hidden_envoy_deprecated_use_original_dst": True,
    "envoy.reloadable_features.http_reject_path_with_fragment": False,
    "envoy.reloadable_features.fixed_heap_use_allocated": True,
    "envoy.reloadable_features.coalesce_lb_rebuilds_on_batch_update": False,
}

LOG_TEXT_FORMAT = "%Y-%m-%dT%T.%fZ\t%l\tenvoy %n %g:%#\t%v\tthread=%t"
# Same fields as the text form; %j is the message escaped for JSON.
LOG_JSON_FORMAT: Mapping[str, str] = {
    "level": "%l",
    "time": "%Y-%m-%dT%T.%fZ",
    "scope": "envoy %n",
    "msg": "%j",
    "caller": "%g:%#",
    "thread": "%t",
}

# Without ProxyConfig globalDownstreamConnectionLimit Istio uses int32 max, i.e. "no limit" but the monitor
# is present so the runtime key can still tune it.
DEFAULT_MAX_DOWNSTREAM_CONNECTIONS = 2147483647

_STATS_TAGS: tuple[tuple[str, str], ...] = (
    ("cluster_name", r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"),
    ("tcp_prefix", r"^tcp\.((.*?)\.)\w+?$"),
    ("response_code", r"_rq(_(\d{3}))$"),
    ("response_code_class", r"_rq(_(\dxx))$"),
    (
        "http_conn_manager_listener_prefix",
        r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)",
    ),
    ("http_conn_manager_prefix", r"^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"),
    ("listener_address", r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"),
    ("mongo_prefix", r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"),
    ("cache", r"(cache\.(.+?)\.)"),
    ("component", r"(component\.(.+?)\.)"),
    ("tag", r"(tag\.(.+?);\.)"),
    ("wasm_filter", r"(wasm_filter\.(.+?)\.)"),
    ("authz_enforce_result", r"rbac(\.(allowed|denied))"),
    ("authz_dry_run_action", r"(\.istio_dry_run_(allow|deny)_)"),
    ("authz_dry_run_result", r"(\.shadow_(allowed|denied))"),
)

_INCLUSION_PREFIXES = ("cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm")
_INCLUSION_SUFFIXES = ("rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied")
_INCLUSION_REGEXPS = (r"vhost\..*\.route\..*",)

_LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical", "off")


@dataclass(frozen=True)
class NodeInfo:
    """What istiod learns about this proxy from the bootstrap ``node`` (built by config, §6.1/§6.2)."""

    id: str
    cluster: str
    metadata: Mapping[str, Any]
    locality: Mapping[str, str] | None = None


@dataclass(frozen=True)
class EnvoySettings:
    binary: Path | None  # None → vm_agent.envoy_binary.find_envoy_binary()
    config_dir: Path  # ProxyConfig.configPath; envoy-rev.json is written here (dir 0700)
    node: NodeInfo
    xds_socket: Path
    sds_socket: Path
    admin_port: int = 15000
    status_port: int = 15020
    readiness_port: int = 15021
    prometheus_port: int = 15090
    ipv6_only: bool = False  # every node IP is IPv6 → ::/::1 and --local-address-ip-version v6
    delta_xds: bool = True
    drain_duration_s: float = 45.0
    termination_drain_duration_s: float = 5.0
    # A sidecar drains its inbound listeners only (outbound calls of the draining app keep working); a gateway's
    # listeners are all "inbound" to it, so it drains every one (pilot-agent: DrainListeners(inboundonly=Sidecar)).
    drain_inbound_only: bool = True
    concurrency: int | None = None
    log_level: str = "warning"
    component_log_level: str | None = None
    # Kept for ProxyConfig parity: current Envoy has no object-name length limit to set.
    stat_name_length: int = 189
    metrics_localhost_only: bool = False
    runtime_values: Mapping[str, str] = field(default_factory=dict)
    pid_file: Path | None = None  # in the state folder; lets the next agent run find a leftover Envoy
    extra_args: tuple[str, ...] = ()
    max_downstream_connections: int = DEFAULT_MAX_DOWNSTREAM_CONNECTIONS
    file_flush_interval_ms: int = 1000
    skip_deprecated_logs: bool = True
    # Where Envoy's 15021 listener finds the status server; None → the family's localhost (Istio's choice).
    # Set it to StatusSettings.listen_host when that is a specific loopback address of the other family.
    status_host: str | None = None
    # Envoy's own log lines as JSON, matching the agent's --log-format json.
    log_as_json: bool = False
    # Restart backoff after Envoy exits: initial delay doubling up to the cap; a run this long resets it.
    restart_backoff_initial_s: float = 0.5
    restart_backoff_max_s: float = 30.0
    restart_stable_after_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("admin_port", "status_port", "readiness_port", "prometheus_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"EnvoySettings.{name}: expected a TCP port 1..65535, got {port!r}")
        if self.drain_duration_s < 0 or self.termination_drain_duration_s < 0:
            raise ValueError("EnvoySettings: drain durations must not be negative")
        if not 0 < self.restart_backoff_initial_s <= self.restart_backoff_max_s:
            raise ValueError(
                "EnvoySettings.restart_backoff_initial_s/restart_backoff_max_s: expected 0 < initial <= max, got "
                f"{self.restart_backoff_initial_s}/{self.restart_backoff_max_s}"
            )
        if self.concurrency is not None and self.concurrency < 0:
            raise ValueError(f"EnvoySettings.concurrency: expected >= 0, got {self.concurrency}")
        level, _ = split_log_level(self.log_level)
        if level is not None and level not in _LOG_LEVELS:
            raise ValueError(
                f"EnvoySettings.log_level: expected one of {', '.join(_LOG_LEVELS)} (optionally with "
                f"component:level items), got {self.log_level!r}"
            )
        if not self.node.id.count("~") == 3:
            raise ValueError(f"EnvoySettings.node.id: expected type~ip~id~domain, got {self.node.id!r}")

    @property
    def bootstrap_path(self) -> Path:
        return self.config_dir / BOOTSTRAP_FILE

    @property
    def localhost(self) -> str:
        return "::1" if self.ipv6_only else "127.0.0.1"

    @property
    def wildcard(self) -> str:
        return "::" if self.ipv6_only else "0.0.0.0"


def runtime_layer(values: Mapping[str, str]) -> dict[str, Any]:
    """Istio's defaults overlaid with ProxyConfig runtimeValues: "true"/"false" become booleans, "" deletes."""
    layer: dict[str, Any] = dict(DEFAULT_RUNTIME)
    for key, value in values.items():
        if value == "":
            layer.pop(key, None)
        elif value in ("true", "false"):
            layer[key] = value == "true"
        else:
            layer[key] = value
    return layer


def _socket_address(address: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"protocol": "TCP", "address": address, "port_value": port}}


def _static_cluster(name: str, address: dict[str, Any], connect_timeout: str) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


_HTTP2_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}

_ROUTER = {
    "name": "envoy.filters.http.router",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
}


def _http_listener(
    name: str, address: str, port: int, stat_prefix: str, prefix: str, cluster: str, http_filters: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "name": name,
        "address": _socket_address(address, port),
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                            ".v3.HttpConnectionManager",
                            "codec_type": "AUTO",
                            "stat_prefix": stat_prefix,
                            "route_config": {
                                "virtual_hosts": [
                                    {
                                        "name": "backend",
                                        "domains": ["*"],
                                        "routes": [{"match": {"prefix": prefix}, "route": {"cluster": cluster}}],
                                    }
                                ]
                            },
                            "http_filters": http_filters,
                        },
                    }
                ]
            }
        ],
    }


def _compressor(name: str, type_url: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.compressor",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor",
            "compressor_library": {"name": name, "typed_config": {"@type": type_url}},
            "remove_accept_encoding_header": True,
        },
    }


def _metadata_discovery_enabled(settings: EnvoySettings) -> bool:
    # Istio adds its istio.workload.BootstrapExtension only on Delta; upstream Envoy builds do not know it,
    # so it is rendered only when node metadata asks for it.
    return settings.delta_xds and str(settings.node.metadata.get("METADATA_DISCOVERY", "")).lower() == "true"


def render_bootstrap(settings: EnvoySettings) -> dict[str, Any]:
    """The Envoy bootstrap as a JSON-able dict (write it with :func:`write_bootstrap`)."""
    localhost = settings.localhost
    node: dict[str, Any] = {
        "id": settings.node.id,
        "cluster": settings.node.cluster,
        "metadata": copy.deepcopy(dict(settings.node.metadata)),
    }
    locality = {k: v for k, v in (settings.node.locality or {}).items() if k in ("region", "zone", "sub_zone") and v}
    if locality:
        node["locality"] = locality

    extensions: list[dict[str, Any]] = []
    if _metadata_discovery_enabled(settings):
        extensions.append(
            {
                "name": "metadata_discovery",
                "typed_config": {
                    "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                    "type_url": "type.googleapis.com/istio.workload.BootstrapExtension",
                    "value": {"config_source": {"ads": {}}},
                },
            }
        )
    extensions.append(
        {
            "name": "envoy.bootstrap.internal_listener",
            "typed_config": {
                "@type": "type.googleapis.com/udpa.type.v1.TypedStruct",
                "type_url": "type.googleapis.com/envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
                "value": {"buffer_size_kb": 64},
            },
        }
    )

    patterns: list[dict[str, Any]] = [{"prefix": "reporter="}]
    if _metadata_discovery_enabled(settings):
        patterns.append({"prefix": "workload_discovery"})
    patterns += [{"prefix": p} for p in _INCLUSION_PREFIXES]
    suffixes = list(_INCLUSION_SUFFIXES)
    if str(settings.node.metadata.get("EXIT_ON_ZERO_ACTIVE_CONNECTIONS", "")).lower() == "true":
        suffixes.append("downstream_cx_active")
    patterns += [{"suffix": s} for s in suffixes]
    patterns += [{"safe_regex": {"regex": r}} for r in _INCLUSION_REGEXPS]
    patterns += [{"prefix": "component"}, {"prefix": "istio"}]

    ads_source = {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}
    xds_cluster = _static_cluster("xds-grpc", {"pipe": {"path": str(settings.xds_socket)}}, "1s")
    xds_cluster.update(
        {
            "circuit_breakers": {
                "thresholds": [
                    {
                        "priority": priority,
                        "max_connections": 100000,
                        "max_pending_requests": 100000,
                        "max_requests": 100000,
                    }
                    for priority in ("DEFAULT", "HIGH")
                ]
            },
            "upstream_connection_options": {"tcp_keepalive": {"keepalive_time": 300}},
            "max_requests_per_connection": 1,
            "typed_extension_protocol_options": copy.deepcopy(_HTTP2_OPTIONS),
        }
    )
    sds_cluster = _static_cluster("sds-grpc", {"pipe": {"path": str(settings.sds_socket)}}, "1s")
    sds_cluster["typed_extension_protocol_options"] = copy.deepcopy(_HTTP2_OPTIONS)

    metrics_address = localhost if settings.metrics_localhost_only else settings.wildcard
    prometheus = _http_listener(
        f"{metrics_address}_{settings.prometheus_port}",
        metrics_address,
        settings.prometheus_port,
        "stats",
        "/stats/prometheus",
        "prometheus_stats",
        [
            _compressor("brotli", "type.googleapis.com/envoy.extensions.compression.brotli.compressor.v3.Brotli"),
            _compressor("zstd", "type.googleapis.com/envoy.extensions.compression.zstd.compressor.v3.Zstd"),
            _compressor("gzip", "type.googleapis.com/envoy.extensions.compression.gzip.compressor.v3.Gzip"),
            copy.deepcopy(_ROUTER),
        ],
    )
    # Scrapes and readiness must get through even when the proxy is saturated.
    prometheus["ignore_global_conn_limit"] = True
    prometheus["bypass_overload_manager"] = True
    readiness = _http_listener(
        f"{settings.wildcard}_{settings.readiness_port}",
        settings.wildcard,
        settings.readiness_port,
        "agent",
        "/healthz/ready",
        "agent",
        [copy.deepcopy(_ROUTER)],
    )

    return {
        "node": node,
        "application_log_config": {
            "log_format": {"json_format": dict(LOG_JSON_FORMAT)}
            if settings.log_as_json
            else {"text_format": LOG_TEXT_FORMAT}
        },
        "layered_runtime": {
            "layers": [
                {"name": "global config", "static_layer": runtime_layer(settings.runtime_values)},
                {"name": "admin", "admin_layer": {}},
            ]
        },
        "bootstrap_extensions": extensions,
        "stats_config": {
            "use_all_default_tags": False,
            "stats_tags": [{"tag_name": name, "regex": regex} for name, regex in _STATS_TAGS],
            "stats_matcher": {"inclusion_list": {"patterns": patterns}},
        },
        "admin": {
            "access_log": [
                {
                    "name": "envoy.access_loggers.file",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                        "path": "/dev/null",
                    },
                }
            ],
            "profile_path": "/var/lib/istio/data/envoy.prof",
            "address": _socket_address(localhost, settings.admin_port),
        },
        "dynamic_resources": {
            "lds_config": dict(ads_source),
            "cds_config": dict(ads_source),
            "ads_config": {
                "api_type": "DELTA_GRPC" if settings.delta_xds else "GRPC",
                "set_node_on_first_message_only": True,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            },
        },
        "static_resources": {
            "clusters": [
                _static_cluster("prometheus_stats", _socket_address(localhost, settings.admin_port), "0.250s"),
                _static_cluster(
                    "agent", _socket_address(settings.status_host or localhost, settings.status_port), "0.250s"
                ),
                sds_cluster,
                xds_cluster,
            ],
            "listeners": [prometheus, readiness],
        },
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections"
                        ".v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": settings.max_downstream_connections,
                    },
                }
            ]
        },
        "deferred_stat_options": {"enable_deferred_creation_stats": True},
    }


def write_bootstrap(settings: EnvoySettings) -> Path:
    """Render and write ``<config_dir>/envoy-rev.json`` atomically; the directory is made 0700."""
    settings.config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(settings.config_dir, 0o700)
    path = settings.bootstrap_path
    atomic_write(path, json.dumps(render_bootstrap(settings), indent=1).encode(), 0o600)
    return path


def split_log_level(value: str) -> tuple[str | None, str | None]:
    """Split a pilot-agent ``--proxyLogLevel`` value into (global level, component levels).

    Items without ``:`` set the global level (last wins); ``a:b`` items are component levels; items
    with more colons are dropped, as pilot-agent does.
    """
    level: str | None = None
    components: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        colons = item.count(":")
        if colons == 0:
            level = item
        elif colons == 1:
            components.append(item)
    return level, ",".join(components) or None


def envoy_command(settings: EnvoySettings, bootstrap_path: Path) -> list[str]:
    """argv for Envoy, in pilot-agent's order (§7.1); the binary is resolved by the caller."""
    from vm_agent.envoy_binary import find_envoy_binary

    binary = settings.binary if settings.binary is not None else find_envoy_binary()
    args = [
        str(binary),
        "-c",
        str(bootstrap_path),
        "--drain-time-s",
        # Envoy takes whole seconds.
        str(round(settings.drain_duration_s)),
        "--drain-strategy",
        "immediate",
        "--local-address-ip-version",
        "v6" if settings.ipv6_only else "v4",
        "--file-flush-interval-msec",
        str(settings.file_flush_interval_ms),
        "--disable-hot-restart",
        "--allow-unknown-static-fields",
    ]
    level, components = split_log_level(settings.log_level)
    args += ["-l", level or "warning"]
    components = components or settings.component_log_level
    if components:
        args += ["--component-log-level", components]
    if settings.skip_deprecated_logs:
        args.append("--skip-deprecated-logs")
    if settings.concurrency:
        args += ["--concurrency", str(settings.concurrency)]
    args += list(settings.extra_args)
    return args
