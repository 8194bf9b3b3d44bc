"""The NameTable (NDS) a proxy gets from the local mesh, built like istiod's (istio-agent.md §12.5).

The agent's DNS server answers only for names in this table and forwards the rest, so a service
without a usable address is left out rather than given a placeholder.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from vm_agent.mesh.model import MeshSnapshot, ServiceEntry
from vm_agent.mesh.xdsgen import MeshPort, ProxyView, ipv6_vip, mesh_services, service_endpoints
from vm_agent.proto import nds_pb2

__all__ = ["name_table"]


def _version(addr: str) -> int | None:
    try:
        return ipaddress.ip_address(addr).version
    except ValueError:
        return None  # CIDRs and host names are not DNS answers


def _families(proxy: ProxyView) -> set[int]:
    fams = {v for v in (_version(ip) for ip in proxy.ips) if v is not None}
    return fams or {4}


def name_table(
    snapshot: MeshSnapshot,
    proxy: ProxyView,
    *,
    vips: Mapping[str, str],
    domain_suffix: str = "cluster.local",
) -> nds_pb2.NameTable:
    """The NameTable for one proxy; ``vips`` are the auto-allocated ServiceEntry addresses (host → IPv4)."""
    families = _families(proxy)
    # Only proxies that capture DNS can use auto-allocated VIPs: nobody else would resolve them.
    use_vips = proxy.dns_capture
    table = nds_pb2.NameTable()
    kube_hosts: set[str] = set()
    for svc in mesh_services(snapshot, vips={}, domain_suffix=domain_suffix, visible_to=proxy.namespace):
        ips: list[str] = [a for a in svc.addresses if _version(a) is not None]
        if not ips and isinstance(svc.source, ServiceEntry) and not svc.source.addresses and use_vips:
            v4 = vips.get(svc.host)
            if v4 is not None:
                if 4 in families:
                    ips.append(v4)
                if 6 in families:
                    ips.append(ipv6_vip(v4))
        passthrough = svc.headless or (isinstance(svc.source, ServiceEntry) and svc.resolution == "PASSTHROUGH")
        if not ips and passthrough:
            # Headless / pass-through: answer with the ready endpoints themselves.
            port = svc.ports[0] if svc.ports else MeshPort(0, "", "TCP", None)
            for ep in service_endpoints(snapshot, svc, port, trust_domain=""):
                if _version(ep.address) is not None and ep.address not in ips:
                    ips.append(ep.address)
        if not ips:
            continue
        if svc.registry == "Kubernetes":
            info = nds_pb2.NameTable.NameInfo(
                ips=ips, registry="Kubernetes", shortname=svc.name, namespace=svc.namespace
            )
            table.table[svc.host].CopyFrom(info)
            kube_hosts.add(svc.host)
            continue
        if svc.host in kube_hosts:
            continue  # a Kubernetes service owns this name
        if svc.host in table.table:
            existing = table.table[svc.host]
            existing.ips.extend(ip for ip in ips if ip not in existing.ips)
        else:
            table.table[svc.host].CopyFrom(nds_pb2.NameTable.NameInfo(ips=ips, registry="External"))
    return table
