"""What a lab VM's Envoy actually holds and counted, read from its admin API inside the VM's namespace."""

from __future__ import annotations

import json
from typing import Any

from tests.interop.netlab.vm import Vm


def endpoints(vm: Vm, cluster: str) -> list[str]:
    """``ip:port`` of every endpoint Envoy has for ``cluster`` (from /clusters?format=json)."""
    code, body = vm.local_get(15000, "/clusters?format=json")
    if code != 200:
        return []
    for status in json.loads(body).get("cluster_statuses", []):
        if status.get("name") == cluster:
            out = []
            for host in status.get("host_statuses", []):
                sock = host.get("address", {}).get("socket_address", {})
                out.append(f"{sock.get('address')}:{sock.get('port_value')}")
            return sorted(out)
    return []


def active_cluster(vm: Vm, name: str) -> dict[str, Any] | None:
    code, body = vm.local_get(15000, "/config_dump?resource=dynamic_active_clusters")
    if code != 200:
        return None
    for cfg in json.loads(body).get("configs", []):
        cluster = cfg.get("cluster", {})
        if cluster.get("name") == name:
            return dict(cluster)
    return None


def mtls_sni(vm: Vm, name: str) -> str | None:
    """The SNI of the Istio mTLS transport socket (the tlsMode=istio match) of cluster ``name``."""
    cluster = active_cluster(vm, name)
    if cluster is None:
        return None
    for match in cluster.get("transport_socket_matches", []):
        if match.get("name") == "tlsMode-istio":
            sni = match.get("transport_socket", {}).get("typed_config", {}).get("sni")
            return str(sni) if sni is not None else None
    return None


def connections(vm: Vm, cluster: str) -> int:
    """Connections Envoy opened to ``cluster``'s hosts (per-host ``cx_total`` from /clusters: kept for every
    cluster, whatever the bootstrap's stats inclusion list leaves out of /stats, as Istio's does)."""
    code, body = vm.local_get(15000, "/clusters?format=json")
    if code != 200:
        return 0
    total = 0
    for status in json.loads(body).get("cluster_statuses", []):
        if status.get("name") != cluster:
            continue
        for host in status.get("host_statuses", []):
            for stat in host.get("stats", []):
                if stat.get("name") == "cx_total":
                    total += int(stat.get("value", 0))
    return total
