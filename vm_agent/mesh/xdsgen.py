"""What one connected proxy receives from the local mesh: clusters, endpoints, listeners and routes.

The shape follows istiod's sidecar configuration (names such as ``outbound|8080||host``,
``inbound|8080||``, ``virtualInbound``, ``PassthroughCluster``; TLS secrets ``default`` and ``ROOTCA``
fetched over the bootstrap's ``sds-grpc`` cluster) so that an Envoy driven by vm-agent behaves the same
whether the control plane is a real istiod or this local mesh.

Resources are written as dicts in Envoy's JSON form and parsed into protobuf messages: that keeps them
readable next to ``istioctl proxy-config -o json`` output, and the parser rejects misspelled fields.
"""

from __future__ import annotations

import ipaddress
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2

# The imports below register the typed_config message types used in "@type" fields.
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2  # noqa: F401
from envoy.extensions.transport_sockets.raw_buffer.v3 import raw_buffer_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import any_pb2, json_format
from google.protobuf.message import Message

from vm_agent.logs import get_logger
from vm_agent.mesh import telemetry as mesh_telemetry
from vm_agent.mesh.model import MeshSnapshot, Service, ServiceEntry, is_ip
from vm_agent.mesh.services import (
    Endpoint,
    MeshPort,
    MeshService,
    ProxyView,
    allocate_vips,
    endpoint_healthy,
    endpoint_port,
    ipv6_vip,
    mesh_services,
    own_workload,
    protocol_from_name,
    selector_of,
    selects,
    service_endpoints,
)

__all__ = [
    "CLUSTER_TYPE_URL",
    "ENDPOINT_TYPE_URL",
    "LISTENER_TYPE_URL",
    "ROUTE_TYPE_URL",
    "Endpoint",
    "MeshPort",
    "MeshService",
    "ProxyView",
    "allocate_vips",
    "endpoint_healthy",
    "generate",
    "ipv6_vip",
    "mesh_services",
    "own_workload",
    "service_endpoints",
]

log = get_logger("mesh.xdsgen")

CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE_URL = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER_TYPE_URL = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE_TYPE_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

SDS_CLUSTER = "sds-grpc"
SECRET_CERT = "default"
SECRET_ROOT = "ROOTCA"
BLACKHOLE = "BlackHoleCluster"
PASSTHROUGH = "PassthroughCluster"
INBOUND_PASSTHROUGH = "InboundPassthroughCluster"
VIRTUAL_OUTBOUND_PORT = 15001
VIRTUAL_INBOUND_PORT = 15006
# Istio's own ports; a service on one of them would collide with the proxy (NONE mode binds for real).
RESERVED_PORTS = frozenset({15000, 15001, 15004, 15006, 15008, 15009, 15020, 15021, 15053, 15090})
HTTP_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC", "GRPC-Web"})
H2_PROTOCOLS = frozenset({"HTTP2", "GRPC", "GRPC-Web"})
# A sidecar proxies TCP only; these ports get no cluster or listener (their traffic bypasses Envoy).
NOT_PROXIED = frozenset({"UDP", "SCTP"})
# What a mesh client offers and a mesh server accepts: the Istio markers first so that a server
# that sees them knows its peer is a sidecar; the HTTP codec is sniffed, not negotiated.
CLIENT_ALPN = ("istio-peer-exchange", "istio")
SERVER_ALPN = ("istio-peer-exchange", "istio", "h2", "http/1.1")

_T = {
    "hcm": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "tcp": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "router": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    "odst": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    "tlsi": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
    "utls": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "dtls": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    "raw": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
    "hpo": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
}


# --------------------------------------------------------------------------------------------------
# Envoy JSON builders


def _sds(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "api_config_source": {
                "api_type": "GRPC",
                "set_node_on_first_message_only": True,
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
            },
            "initial_fetch_timeout": "0s",
            "resource_api_version": "V3",
        },
    }


def _common_tls(alpn: Iterable[str], sans: Iterable[str] = ()) -> dict[str, Any]:
    default_ctx: dict[str, Any] = {}
    sans = sorted(set(sans))
    if sans:
        default_ctx["match_typed_subject_alt_names"] = [{"san_type": "URI", "matcher": {"exact": s}} for s in sans]
    return {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
        "alpn_protocols": list(alpn),
        "tls_certificate_sds_secret_configs": [_sds(SECRET_CERT)],
        "combined_validation_context": {
            "default_validation_context": default_ctx,
            "validation_context_sds_secret_config": _sds(SECRET_ROOT),
        },
    }


def _upstream_tls(sni: str, sans: Iterable[str]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {"@type": _T["utls"], "common_tls_context": _common_tls(CLIENT_ALPN, sans), "sni": sni},
    }


def _downstream_tls() -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _T["dtls"],
            "common_tls_context": _common_tls(SERVER_ALPN),
            "require_client_certificate": True,
        },
    }


def _ads() -> dict[str, Any]:
    return {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}


def _sock(address: str, port: int) -> dict[str, Any]:
    if address.startswith("unix://"):
        return {"pipe": {"path": address.removeprefix("unix://")}}
    return {"socket_address": {"address": address, "port_value": port}}


def _h2_options() -> dict[str, Any]:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": _T["hpo"],
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def _tcp_proxy(stat_prefix: str, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {"@type": _T["tcp"], "stat_prefix": stat_prefix, "cluster": cluster},
    }


def _router() -> dict[str, Any]:
    return {"name": "envoy.filters.http.router", "typed_config": {"@type": _T["router"]}}


def _route_to(cluster: str) -> dict[str, Any]:
    return {
        "name": "default",
        "match": {"prefix": "/"},
        "route": {
            "cluster": cluster,
            "timeout": "0s",
            "max_stream_duration": {"max_stream_duration": "0s", "grpc_timeout_header_max": "0s"},
        },
    }


def _hcm_inbound(port: int) -> dict[str, Any]:
    cluster = f"inbound|{port}||"
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _T["hcm"],
            "stat_prefix": f"inbound_0.0.0.0_{port}",
            "codec_type": "AUTO",
            "route_config": {
                "name": cluster,
                "validate_clusters": False,
                "virtual_hosts": [{"name": f"inbound|http|{port}", "domains": ["*"], "routes": [_route_to(cluster)]}],
            },
            "http_filters": [_router()],
            "use_remote_address": False,
            "normalize_path": True,
            "server_name": "istio-envoy",
            # The application learns the caller's SPIFFE identity from this header, as behind istiod.
            "forward_client_cert_details": "APPEND_FORWARD",
            "set_current_client_cert_details": {"subject": True, "dns": True, "uri": True},
        },
    }


def _hcm_outbound(port: int, bind: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _T["hcm"],
            "stat_prefix": f"outbound_{bind}_{port}",
            "codec_type": "AUTO",
            "rds": {"config_source": _ads(), "route_config_name": str(port)},
            "http_filters": [_router()],
            "use_remote_address": False,
            "normalize_path": True,
        },
    }


def _outbound_name(port: int, host: str) -> str:
    return f"outbound|{port}||{host}"


_PACKED: OrderedDict[tuple[str, str], any_pb2.Any] = OrderedDict()
_PACKED_MAX = 50_000


def _packed(d: dict[str, Any], cls: type[Message], type_url: str) -> any_pb2.Any:
    """Parse and pack one resource; most resources are the same for every proxy, so remember them."""
    k = (type_url, json.dumps(d, sort_keys=True, separators=(",", ":")))
    hit = _PACKED.get(k)
    if hit is not None:
        _PACKED.move_to_end(k)
        out = any_pb2.Any()
        out.CopyFrom(hit)
        return out
    msg = cls()
    json_format.ParseDict(d, msg)
    packed = any_pb2.Any(type_url=type_url, value=msg.SerializeToString(deterministic=True))
    _PACKED[k] = packed
    if len(_PACKED) > _PACKED_MAX:
        _PACKED.popitem(last=False)
    out = any_pb2.Any()
    out.CopyFrom(packed)
    return out


# --------------------------------------------------------------------------------------------------
# Generation


@dataclass
class _Out:
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)
    listeners: dict[str, dict[str, Any]] = field(default_factory=dict)
    routes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _base_clusters(out: _Out) -> None:
    out.clusters[BLACKHOLE] = {"name": BLACKHOLE, "type": "STATIC", "connect_timeout": "10s"}
    out.clusters[PASSTHROUGH] = {
        "name": PASSTHROUGH,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
    }
    out.clusters[INBOUND_PASSTHROUGH] = {
        "name": INBOUND_PASSTHROUGH,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "10s",
        # 127.0.0.6 marks the proxy's own inbound traffic so capture rules let it reach the app.
        "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}},
    }


def _cla(name: str, eps: list[Endpoint], cluster_id: str) -> dict[str, Any]:
    by_locality: dict[str, list[dict[str, Any]]] = {}
    for ep in eps:
        if not (ep.address.startswith("unix://") or is_ip(ep.address)):
            continue  # EDS cannot carry host names
        lb: dict[str, Any] = {
            "endpoint": {"address": _sock(ep.address, ep.port)},
            "load_balancing_weight": ep.weight or 1,
        }
        md: dict[str, Any] = {}
        if ep.identity is not None:
            md["envoy.transport_socket_match"] = {"tlsMode": "istio"}
        if ep.workload:
            md["istio"] = {"workload": mesh_telemetry.endpoint_workload(ep, cluster_id)}
        if md:
            lb["metadata"] = {"filter_metadata": md}
        by_locality.setdefault(ep.locality, []).append(lb)
    groups = []
    for loc, lbs in sorted(by_locality.items()):
        g: dict[str, Any] = {"lb_endpoints": lbs, "load_balancing_weight": sum(x["load_balancing_weight"] for x in lbs)}
        parts = loc.split("/") if loc else []
        if parts:
            g["locality"] = dict(zip(("region", "zone", "sub_zone"), parts, strict=False))
        groups.append(g)
    return {"cluster_name": name, "endpoints": groups}


def _outbound_cluster(svc: MeshService, port: MeshPort, eps: list[Endpoint]) -> dict[str, Any]:
    name = _outbound_name(port.number, svc.host)
    c: dict[str, Any] = {"name": name, "connect_timeout": "10s", "lb_policy": "ROUND_ROBIN"}
    if svc.resolution == "EDS":
        c["type"] = "EDS"
        c["eds_cluster_config"] = {"eds_config": _ads(), "service_name": name}
    elif svc.resolution in ("DNS", "DNS_ROUND_ROBIN"):
        c["type"] = "STRICT_DNS" if svc.resolution == "DNS" else "LOGICAL_DNS"
        c["dns_lookup_family"] = "V4_ONLY"
        targets = [(e.address, e.port) for e in eps] or [
            (svc.host, port.target_port if isinstance(port.target_port, int) else port.number)
        ]
        if c["type"] == "LOGICAL_DNS":
            targets = targets[:1]
        c["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _sock(a, p)}} for a, p in targets]}],
        }
    else:
        c["type"] = "ORIGINAL_DST"
        c["lb_policy"] = "CLUSTER_PROVIDED"
    if port.protocol in H2_PROTOCOLS:
        c["typed_extension_protocol_options"] = _h2_options()
    mesh_capable = svc.resolution == "EDS" and (
        isinstance(svc.source, Service) or svc.source.workload_selector is not None or any(e.identity for e in eps)
    )
    mesh_telemetry.decorate_cluster(
        c,
        host=svc.host,
        name=svc.name if svc.registry == "Kubernetes" else svc.host,
        namespace=svc.namespace,
        mesh=mesh_capable,
    )
    if isinstance(svc.source, ServiceEntry) and svc.source.location != "MESH_INTERNAL":
        c["metadata"]["filter_metadata"]["istio"]["external"] = True
    if mesh_capable:
        sans = [e.identity for e in eps if e.identity]
        sni = f"outbound_.{port.number}_._.{svc.host}"
        c["transport_socket_matches"] = [
            {"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": _upstream_tls(sni, sans)},
            {
                "name": "tlsMode-disabled",
                "match": {},
                "transport_socket": {
                    "name": "envoy.transport_sockets.raw_buffer",
                    "typed_config": {"@type": _T["raw"]},
                },
            },
        ]
    return c


def _inbound_ports(snapshot: MeshSnapshot, proxy: ProxyView, services: list[MeshService]) -> list[MeshPort]:
    """The ports the proxy's own workload serves, as (endpoint port, protocol)."""
    own = own_workload(snapshot, proxy)
    if own is None:
        return []
    ns, spec = own
    found: dict[int, MeshPort] = {}
    for svc in services:
        if svc.namespace != ns:
            continue
        selector = selector_of(svc)
        if selector is None or not selects(selector, spec.labels):
            continue
        for p in svc.ports:
            if p.protocol in NOT_PROXIED:
                continue
            n = endpoint_port(p, spec.ports)
            found.setdefault(n, MeshPort(n, p.name, p.protocol, n))
    for pname, n in sorted(spec.ports.items()):
        found.setdefault(n, MeshPort(n, pname, protocol_from_name(pname), n))
    return [found[n] for n in sorted(found)]


def _own_services(snapshot: MeshSnapshot, proxy: ProxyView, services: list[MeshService]) -> list[MeshService]:
    """Services that select this proxy's own workload (in NONE mode its app already serves them)."""
    own = own_workload(snapshot, proxy)
    if own is None:
        return []
    ns, spec = own
    return [
        svc
        for svc in services
        if svc.namespace == ns and (sel := selector_of(svc)) is not None and selects(sel, spec.labels)
    ]


def _vhost_domains(svc: MeshService, port: int, proxy_ns: str, domain_suffix: str) -> list[str]:
    names = [svc.host]
    if svc.registry == "Kubernetes":
        base = f"{svc.name}.{svc.namespace}"
        names += [f"{base}.svc", base]
        if svc.namespace == proxy_ns:
            names.append(svc.name)
    names += list(svc.addresses)
    out: list[str] = []
    for n in names:
        out += [n, f"[{n}]:{port}" if ":" in n else f"{n}:{port}"]
    return out


def generate(
    snapshot: MeshSnapshot,
    proxy: ProxyView,
    *,
    trust_domain: str,
    vips: Mapping[str, str],
    domain_suffix: str = "cluster.local",
    cluster_id: str = "Kubernetes",
    istio_telemetry: bool = True,
) -> dict[str, dict[str, any_pb2.Any]]:
    """type_url → resource name → packed resource (CDS, EDS, LDS, RDS) for one proxy (of cluster ``cluster_id``)."""
    if proxy.interception_mode not in ("REDIRECT", "TPROXY", "NONE"):
        raise ValueError(
            f"ProxyView.interception_mode: expected REDIRECT, TPROXY or NONE, got {proxy.interception_mode!r}"
        )
    none_mode = proxy.interception_mode == "NONE"
    # Auto-allocated VIPs are only for proxies that resolve names through the agent (like istiod).
    services = mesh_services(
        snapshot, vips=vips if proxy.dns_capture else {}, domain_suffix=domain_suffix, visible_to=proxy.namespace
    )
    out = _Out()
    _base_clusters(out)

    # Outbound clusters and endpoints.
    http_by_port: dict[int, list[MeshService]] = {}
    tcp_by_port: dict[int, list[MeshService]] = {}
    for svc in services:
        for port in svc.ports:
            if port.protocol in NOT_PROXIED:
                continue
            eps = service_endpoints(snapshot, svc, port, trust_domain=trust_domain)
            cluster = _outbound_cluster(svc, port, eps)
            out.clusters[cluster["name"]] = cluster
            if cluster["type"] == "EDS":
                out.endpoints[cluster["name"]] = _cla(cluster["name"], eps, cluster_id)
            (http_by_port if port.protocol in HTTP_PROTOCOLS else tcp_by_port).setdefault(port.number, []).append(svc)

    inbound = _inbound_ports(snapshot, proxy, services)
    for p in inbound:
        name = f"inbound|{p.number}||"
        c: dict[str, Any] = {"name": name, "connect_timeout": "10s"}
        if none_mode:
            c["type"] = "STATIC"
            c["load_assignment"] = {
                "cluster_name": name,
                "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _sock("127.0.0.1", p.number)}}]}],
            }
        else:
            c["type"] = "ORIGINAL_DST"
            c["lb_policy"] = "CLUSTER_PROVIDED"
            c["upstream_bind_config"] = {"source_address": {"address": "127.0.0.6", "port_value": 0}}
        if p.protocol in H2_PROTOCOLS:
            c["typed_extension_protocol_options"] = _h2_options()
        owner = next((s for s in _own_services(snapshot, proxy, services) if p.name in {q.name for q in s.ports}), None)
        if owner is not None:
            mesh_telemetry.decorate_cluster(c, host=owner.host, name=owner.name, namespace=owner.namespace, mesh=False)
        out.clusters[name] = c

    if none_mode:
        _listeners_none(out, snapshot, proxy, services, inbound, http_by_port, tcp_by_port, domain_suffix)
    else:
        _listeners_redirect(out, proxy, inbound, http_by_port, tcp_by_port, domain_suffix)

    if istio_telemetry:
        for lis in out.listeners.values():
            mesh_telemetry.decorate_listener(lis)
    else:
        for c in out.clusters.values():
            c.pop("filters", None)

    result: dict[str, dict[str, any_pb2.Any]] = {
        CLUSTER_TYPE_URL: {},
        ENDPOINT_TYPE_URL: {},
        LISTENER_TYPE_URL: {},
        ROUTE_TYPE_URL: {},
    }
    for n, d in out.clusters.items():
        result[CLUSTER_TYPE_URL][n] = _packed(d, cluster_pb2.Cluster, CLUSTER_TYPE_URL)
    for n, d in out.endpoints.items():
        result[ENDPOINT_TYPE_URL][n] = _packed(d, endpoint_pb2.ClusterLoadAssignment, ENDPOINT_TYPE_URL)
    for n, d in out.listeners.items():
        result[LISTENER_TYPE_URL][n] = _packed(d, listener_pb2.Listener, LISTENER_TYPE_URL)
    for n, d in out.routes.items():
        result[ROUTE_TYPE_URL][n] = _packed(d, route_pb2.RouteConfiguration, ROUTE_TYPE_URL)
    return result


def _route_config(
    port: int, svcs: list[MeshService], proxy_ns: str, domain_suffix: str, fallback: str
) -> dict[str, Any]:
    used: set[str] = set()
    vhosts = []
    for svc in sorted(svcs, key=lambda s: (s.namespace != proxy_ns, s.host)):
        domains = [d for d in _vhost_domains(svc, port, proxy_ns, domain_suffix) if d not in used]
        if not domains:
            continue
        used.update(domains)
        vhosts.append(
            {"name": f"{svc.host}:{port}", "domains": domains, "routes": [_route_to(_outbound_name(port, svc.host))]}
        )
    vhosts.append({"name": "allow_any", "domains": ["*"], "routes": [_route_to(fallback)]})
    return {"name": str(port), "virtual_hosts": vhosts, "validate_clusters": False}


def _inbound_chain(p: MeshPort, *, match: dict[str, Any] | None) -> dict[str, Any]:
    name = f"inbound|{p.number}||"
    filt = _hcm_inbound(p.number) if p.protocol in HTTP_PROTOCOLS else _tcp_proxy(name, name)
    chain: dict[str, Any] = {"name": name, "transport_socket": _downstream_tls(), "filters": [filt]}
    if match is not None:
        chain["filter_chain_match"] = match
    return chain


def _listeners_redirect(
    out: _Out,
    proxy: ProxyView,
    inbound: list[MeshPort],
    http_by_port: dict[int, list[MeshService]],
    tcp_by_port: dict[int, list[MeshService]],
    domain_suffix: str,
) -> None:
    out.listeners["virtualOutbound"] = {
        "name": "virtualOutbound",
        "address": _sock("0.0.0.0", VIRTUAL_OUTBOUND_PORT),
        "use_original_dst": True,
        "traffic_direction": "OUTBOUND",
        "filter_chains": [{"name": "virtualOutbound-catchall-tcp", "filters": [_tcp_proxy(PASSTHROUGH, PASSTHROUGH)]}],
    }
    chains = [_inbound_chain(p, match={"destination_port": p.number, "transport_protocol": "tls"}) for p in inbound]
    chains.append(
        {
            "name": "virtualInbound-blackhole",
            "filter_chain_match": {"destination_port": VIRTUAL_INBOUND_PORT},
            "filters": [_tcp_proxy(BLACKHOLE, BLACKHOLE)],
        }
    )
    chains.append(
        {"name": "virtualInbound-catchall-tcp", "filters": [_tcp_proxy(INBOUND_PASSTHROUGH, INBOUND_PASSTHROUGH)]}
    )
    out.listeners["virtualInbound"] = {
        "name": "virtualInbound",
        "address": _sock("0.0.0.0", VIRTUAL_INBOUND_PORT),
        "traffic_direction": "INBOUND",
        "listener_filters": [
            {"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": _T["odst"]}},
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": _T["tlsi"]}},
        ],
        "filter_chains": chains,
    }
    if proxy.interception_mode == "TPROXY":
        # TPROXY keeps the original destination on the socket; the listener must accept it as its own.
        out.listeners["virtualInbound"]["transparent"] = True
    for port, svcs in sorted(http_by_port.items()):
        if port in (VIRTUAL_OUTBOUND_PORT, VIRTUAL_INBOUND_PORT):
            continue
        name = f"0.0.0.0_{port}"
        out.routes[str(port)] = _route_config(port, svcs, proxy.namespace, domain_suffix, PASSTHROUGH)
        out.listeners[name] = {
            "name": name,
            "address": _sock("0.0.0.0", port),
            "bind_to_port": False,
            "traffic_direction": "OUTBOUND",
            "filter_chains": [{"filters": [_hcm_outbound(port, "0.0.0.0")]}],
        }
    for port, svcs in sorted(tcp_by_port.items()):
        sni: list[dict[str, Any]] = []
        for svc in sorted(svcs, key=lambda s: s.host):
            cluster = _outbound_name(port, svc.host)
            v4 = [a for a in svc.addresses if ipaddress.ip_address(a).version == 4]
            if v4:
                for addr in v4:
                    name = f"{addr}_{port}"
                    if name in out.listeners:
                        continue
                    out.listeners[name] = {
                        "name": name,
                        "address": _sock(addr, port),
                        "bind_to_port": False,
                        "traffic_direction": "OUTBOUND",
                        "filter_chains": [{"filters": [_tcp_proxy(cluster, cluster)]}],
                    }
            elif any(p.number == port and p.protocol in ("TLS", "HTTPS") for p in svc.ports):
                # No address to match on: TLS carries the host name in SNI, which is enough.
                sni.append(
                    {
                        "filter_chain_match": {"server_names": [svc.host], "transport_protocol": "tls"},
                        "filters": [_tcp_proxy(cluster, cluster)],
                    }
                )
        if sni:
            name = f"0.0.0.0_{port}"
            if name in out.listeners:
                # An HTTP listener already owns the wildcard address; TLS by SNI goes in front of it.
                out.listeners[name]["filter_chains"] = sni + out.listeners[name]["filter_chains"]
                out.listeners[name]["listener_filters"] = [
                    {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": _T["tlsi"]}}
                ]
            else:
                out.listeners[name] = {
                    "name": name,
                    "address": _sock("0.0.0.0", port),
                    "bind_to_port": False,
                    "traffic_direction": "OUTBOUND",
                    "listener_filters": [
                        {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": _T["tlsi"]}}
                    ],
                    "filter_chains": [
                        *sni,
                        {"name": "PassthroughFilterChain", "filters": [_tcp_proxy(PASSTHROUGH, PASSTHROUGH)]},
                    ],
                }


def _listeners_none(
    out: _Out,
    snapshot: MeshSnapshot,
    proxy: ProxyView,
    services: list[MeshService],
    inbound: list[MeshPort],
    http_by_port: dict[int, list[MeshService]],
    tcp_by_port: dict[int, list[MeshService]],
    domain_suffix: str,
) -> None:
    own = own_workload(snapshot, proxy)
    instance_ip = (
        own[1].address if own is not None and own[1].address in proxy.ips else (proxy.ips[0] if proxy.ips else "")
    )
    for p in inbound:
        if not instance_ip:
            break
        name = f"{instance_ip}_{p.number}"
        out.listeners[name] = {
            "name": name,
            "address": _sock(instance_ip, p.number),
            "traffic_direction": "INBOUND",
            "filter_chains": [_inbound_chain(p, match=None)],
        }
    own_hosts = {s.host for s in _own_services(snapshot, proxy, services)}
    # The local app listens on its own ports (on loopback or the wildcard address); binding them
    # again on 127.0.0.1 would fail.
    taken = {p.number for p in inbound}
    ports = sorted(set(http_by_port) | set(tcp_by_port))
    for port in ports:
        if port in RESERVED_PORTS or port in taken:
            continue
        # Pass-through services (headless, resolution NONE) would send the connection back to the
        # loopback address it arrived on.
        http = [s for s in http_by_port.get(port, []) if s.host not in own_hosts and s.resolution != "PASSTHROUGH"]
        tcp = [s for s in tcp_by_port.get(port, []) if s.host not in own_hosts and s.resolution != "PASSTHROUGH"]
        candidates = sorted(
            http + tcp, key=lambda s: (s.namespace != proxy.namespace, s.registry != "Kubernetes", s.host)
        )
        if not candidates:
            continue
        # Without capture a loopback port can stand for only one service: the closest one wins
        # (same namespace, then Kubernetes over ServiceEntry); HTTP still routes others by Host.
        primary = candidates[0]
        cluster = _outbound_name(port, primary.host)
        name = f"127.0.0.1_{port}"
        if primary in http:
            out.routes[str(port)] = _route_config(port, http, proxy.namespace, domain_suffix, cluster)
            filt = _hcm_outbound(port, "127.0.0.1")
        else:
            filt = _tcp_proxy(cluster, cluster)
        if len(candidates) > 1:
            log.debug(
                "port %d on loopback stands for %s; also wanted by %s",
                port,
                primary.host,
                [s.host for s in candidates[1:]],
            )
        out.listeners[name] = {
            "name": name,
            "address": _sock("127.0.0.1", port),
            "traffic_direction": "OUTBOUND",
            "filter_chains": [{"filters": [filt]}],
        }
