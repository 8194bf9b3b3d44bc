"""The services, endpoints and VIPs a proxy sees, as istiod derives them from Services, ServiceEntries and
WorkloadEntries; ``xdsgen`` turns them into Envoy resources.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vm_agent.mesh.model import (
    MeshSnapshot,
    Service,
    ServiceEntry,
    WorkloadEntry,
    WorkloadEntrySpec,
    WorkloadGroup,
    exported_to,
    is_ip,
)

TLS_MODE_LABEL = "security.istio.io/tlsMode"
_VIP4 = ipaddress.ip_network("240.240.0.0/16")
_VIP6_PREFIX = "2001:2::"


@dataclass(frozen=True)
class ProxyView:
    """A connected proxy as the server sees it, identity already verified."""

    node_id: str
    ips: tuple[str, ...]
    namespace: str
    service_account: str | None
    labels: Mapping[str, str] = field(default_factory=dict)
    dns_capture: bool = False
    # REDIRECT (iptables), TPROXY (same listeners, transparent inbound) or NONE (no capture: listeners
    # bind real addresses).
    interception_mode: str = "REDIRECT"
    cluster_id: str = "Kubernetes"
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MeshPort:
    number: int
    name: str
    protocol: str  # Istio protocol name: HTTP, HTTP2, GRPC, TCP, TLS, ...
    target_port: int | str | None


@dataclass(frozen=True)
class MeshService:
    """A Kubernetes Service or one host of a ServiceEntry, the unit istiod builds clusters for."""

    host: str
    name: str
    namespace: str
    registry: str  # "Kubernetes" | "External"
    addresses: tuple[str, ...]  # IP literals usable as listener/DNS addresses (no CIDRs)
    ports: tuple[MeshPort, ...]
    resolution: str  # EDS | DNS | DNS_ROUND_ROBIN | PASSTHROUGH
    headless: bool
    source: Service | ServiceEntry


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int
    labels: Mapping[str, str]
    locality: str
    weight: int
    identity: str | None  # SPIFFE id when the endpoint is a mesh workload (gets mTLS)
    network: str
    workload: str = ""  # the workload name istiod's telemetry uses (its group's name for auto-registered entries)
    namespace: str = ""


def protocol_from_name(name: str, app_protocol: str | None = None) -> str:
    candidate = (app_protocol or name.split("-", 1)[0]).lower()
    if name.lower().startswith("grpc-web"):
        candidate = "grpc-web"
    return {
        "http": "HTTP",
        "http2": "HTTP2",
        "grpc": "GRPC",
        "grpc-web": "GRPC-Web",
        "https": "HTTPS",
        "tls": "TLS",
        "tcp": "TCP",
        "mongo": "Mongo",
        "redis": "Redis",
        "mysql": "MySQL",
        "udp": "UDP",
        "kubernetes.io/h2c": "HTTP2",
    }.get(candidate, "TCP")


def ipv6_vip(v4: str) -> str:
    """The IPv6 twin of an auto-allocated IPv4 VIP (same low 16 bits in 2001:2::/48)."""
    low = int(ipaddress.IPv4Address(v4)) & 0xFFFF
    return f"{_VIP6_PREFIX}{low:x}"


def _needs_vip(se: ServiceEntry, host: str) -> bool:
    # Like istiod: only address-less entries that resolve (NONE means "pass through as is"), and never
    # wildcards (one address cannot stand for many names).
    return not se.addresses and se.resolution != "NONE" and not host.startswith("*.")


def allocate_vips(snapshot: MeshSnapshot, previous: Mapping[str, str]) -> dict[str, str]:
    """host → IPv4 VIP in 240.240.0.0/16 for address-less ServiceEntry hosts; existing assignments are kept."""
    wanted = sorted({h for se in snapshot.of_kind(ServiceEntry) for h in se.hosts if _needs_vip(se, h)})
    out: dict[str, str] = {}
    used: set[str] = set()
    for h in wanted:
        old = previous.get(h)
        if old is not None and old not in used and ipaddress.ip_address(old) in _VIP4:
            out[h] = old
            used.add(old)
    size = _VIP4.num_addresses
    base = int(_VIP4.network_address)
    for h in wanted:
        if h in out:
            continue
        # A hash start keeps a host's address independent of which other hosts exist; probing resolves
        # collisions. Addresses ending in .0 or .255 are skipped: some stacks treat them specially.
        i = int.from_bytes(hashlib.sha256(h.encode()).digest()[:4], "big") % size
        for _ in range(size):
            addr = str(ipaddress.IPv4Address(base + i))
            if addr not in used and not addr.endswith((".0", ".255")):
                break
            i = (i + 1) % size
        else:
            raise RuntimeError("VIP range 240.240.0.0/16 exhausted")
        out[h] = addr
        used.add(addr)
    return out


def mesh_services(
    snapshot: MeshSnapshot,
    *,
    vips: Mapping[str, str],
    domain_suffix: str = "cluster.local",
    visible_to: str | None = None,
) -> list[MeshService]:
    """The services a proxy in namespace ``visible_to`` sees (all when None); ``vips`` fill address-less entries."""
    out: list[MeshService] = []
    for svc in snapshot.of_kind(Service):
        if visible_to is not None and not exported_to(svc, visible_to):
            continue
        ports = tuple(
            MeshPort(
                p.port,
                p.name,
                protocol_from_name(p.name, p.app_protocol) if p.protocol == "TCP" else p.protocol,
                p.target_port,
            )
            for p in svc.ports
        )
        addrs: tuple[str, ...] = (svc.cluster_ip,) if svc.cluster_ip and svc.cluster_ip != "None" else ()
        out.append(
            MeshService(
                host=f"{svc.meta.name}.{svc.meta.namespace}.svc.{domain_suffix}",
                name=svc.meta.name,
                namespace=svc.meta.namespace,
                registry="Kubernetes",
                addresses=addrs,
                ports=ports,
                resolution="PASSTHROUGH" if svc.headless else "EDS",
                headless=svc.headless,
                source=svc,
            )
        )
    for se in snapshot.of_kind(ServiceEntry):
        if visible_to is not None and not exported_to(se, visible_to):
            continue
        se_ports = tuple(MeshPort(p.number, p.name, p.protocol, p.target_port) for p in se.ports)
        resolution = {"STATIC": "EDS", "NONE": "PASSTHROUGH"}.get(se.resolution, se.resolution)
        for host in se.hosts:
            addrs = tuple(a for a in se.addresses if is_ip(a))
            if not se.addresses and host in vips:
                addrs = (vips[host],)
            out.append(
                MeshService(
                    host=host,
                    name=se.meta.name,
                    namespace=se.meta.namespace,
                    registry="External",
                    addresses=addrs,
                    ports=se_ports,
                    resolution=resolution,
                    headless=False,
                    source=se,
                )
            )
    return out


def selector_of(svc: MeshService) -> Mapping[str, str] | None:
    """The labels picking WorkloadEntries as endpoints; None when the service does not select any."""
    if isinstance(svc.source, Service):
        return svc.source.selector or None
    return svc.source.workload_selector


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def workload_name(we: WorkloadEntry) -> str:
    """istiod's workload name for an entry: its auto-registration group, a workload-name label, else its name."""
    return (
        we.meta.annotations.get("istio.io/autoRegistrationGroup")
        or we.meta.labels.get("service.istio.io/workload-name")
        or we.meta.name
    )


def endpoint_healthy(we: WorkloadEntry) -> bool:
    """Health-checked entries need a True Healthy condition; others are out only when marked False."""
    cond = we.condition("Healthy")
    if we.health_checked:
        return cond is not None and cond.status == "True"
    return cond is None or cond.status != "False"


def _spiffe(trust_domain: str, namespace: str, sa: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{sa}"


def endpoint_port(port: MeshPort, ports: Mapping[str, int]) -> int:
    if port.name in ports:
        return ports[port.name]
    if isinstance(port.target_port, int):
        return port.target_port
    if isinstance(port.target_port, str) and port.target_port in ports:
        return ports[port.target_port]
    return port.number


def service_endpoints(
    snapshot: MeshSnapshot, svc: MeshService, port: MeshPort, *, trust_domain: str, healthy_only: bool = True
) -> list[Endpoint]:
    """The endpoints of one service port, in a stable order."""
    out: list[Endpoint] = []
    selector = selector_of(svc)
    if selector is not None:
        for we in snapshot.of_kind(WorkloadEntry):
            if we.meta.namespace != svc.namespace or not selects(selector, we.spec.labels):
                continue
            if healthy_only and not endpoint_healthy(we):
                continue
            if (
                isinstance(svc.source, Service)
                and isinstance(port.target_port, str)
                and port.target_port not in we.spec.ports
                and port.name not in we.spec.ports
            ):
                continue
            out.append(
                Endpoint(
                    address=we.spec.address,
                    port=endpoint_port(port, we.spec.ports),
                    labels=we.spec.labels,
                    locality=we.spec.locality,
                    weight=we.spec.weight,
                    identity=_spiffe(trust_domain, we.meta.namespace, we.spec.service_account),
                    network=we.spec.network,
                    workload=workload_name(we),
                    namespace=we.meta.namespace,
                )
            )
    if isinstance(svc.source, ServiceEntry):
        for ep in svc.source.endpoints:
            ports = ep.get("ports") or {}
            labels = ep.get("labels") or {}
            mesh = labels.get(TLS_MODE_LABEL) == "istio"
            sa = ep.get("serviceAccount") or "default"
            out.append(
                Endpoint(
                    address=str(ep.get("address", "")),
                    port=endpoint_port(port, ports),
                    labels=labels,
                    locality=str(ep.get("locality", "")),
                    weight=int(ep.get("weight", 0)),
                    identity=_spiffe(trust_domain, svc.namespace, sa) if mesh else None,
                    network=str(ep.get("network", "")),
                    workload=svc.source.meta.name,
                    namespace=svc.namespace,
                )
            )
    return out


def own_workload(snapshot: MeshSnapshot, proxy: ProxyView) -> tuple[str, WorkloadEntrySpec] | None:
    """(namespace, spec) of the workload this proxy stands for: its WorkloadEntry, else its group's template."""
    wanted = proxy.metadata.get("WORKLOAD_ENTRY")
    for we in snapshot.of_kind(WorkloadEntry):
        if we.meta.namespace != proxy.namespace:
            continue
        if (wanted and we.meta.name == wanted) or (not wanted and we.spec.address in proxy.ips):
            return we.meta.namespace, we.spec
    group = proxy.metadata.get("AUTO_REGISTER_GROUP")
    if group and proxy.ips:
        wg = snapshot.get(WorkloadGroup, proxy.namespace, str(group))
        if wg is not None:
            # Before registration completes the entry does not exist yet; answer with what it will be.
            t = wg.template
            labels = {**t.labels, **wg.group_labels, **proxy.labels}
            labels.pop("istio-locality", None)
            spec = WorkloadEntrySpec(proxy.ips[0], t.ports, labels, t.network, t.locality, t.weight, t.service_account)
            return proxy.namespace, spec
    return None
