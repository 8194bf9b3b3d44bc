"""NameTable rules of istio-agent.md §12.5."""

from __future__ import annotations

import dataclasses

from vm_agent.mesh.model import MeshSnapshot, key, parse_documents
from vm_agent.mesh.nametable import name_table
from vm_agent.mesh.xdsgen import ProxyView, allocate_vips


def test_kubernetes_services(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    t = name_table(snapshot, vm_proxy, vips=allocate_vips(snapshot, {})).table
    info = t["vm-app.vm-ns.svc.cluster.local"]
    assert list(info.ips) == ["10.96.0.10"]
    assert (info.registry, info.shortname, info.namespace) == ("Kubernetes", "vm-app", "vm-ns")
    assert t["grpc-api.other.svc.cluster.local"].namespace == "other"
    # Headless: the ready endpoints' IPs (db-2 is unhealthy).
    assert list(t["db-pods.vm-ns.svc.cluster.local"].ips) == ["127.0.0.3"]


def test_service_entries(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    vips = allocate_vips(snapshot, {})
    t = name_table(snapshot, vm_proxy, vips=vips).table
    assert list(t["legacy.example.internal"].ips) == ["192.0.2.10"]
    assert t["legacy.example.internal"].registry == "External"
    assert t["legacy.example.internal"].shortname == ""
    assert list(t["*.wild.example"].ips) == ["198.51.100.7"]
    assert list(t["api.example.internal"].ips) == [vips["api.example.internal"]]


def test_vips_only_with_dns_capture(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    vips = allocate_vips(snapshot, {})
    t = name_table(snapshot, dataclasses.replace(vm_proxy, dns_capture=False), vips=vips).table
    assert "api.example.internal" not in t  # no usable address: the agent forwards the name upstream
    assert "vm-internal.mesh" not in t
    assert "legacy.example.internal" in t


def test_vips_follow_proxy_ip_families(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    vips = allocate_vips(snapshot, {})
    v4 = vips["api.example.internal"]
    dual = name_table(snapshot, dataclasses.replace(vm_proxy, ips=("127.0.0.2", "::1")), vips=vips).table
    ips = list(dual["api.example.internal"].ips)
    assert ips[0] == v4
    assert ips[1].startswith("2001:2::")
    v6only = name_table(snapshot, dataclasses.replace(vm_proxy, ips=("::1",)), vips=vips).table
    assert [ip.startswith("2001:2::") for ip in v6only["api.example.internal"].ips] == [True]


_DOCS = """
apiVersion: v1
kind: Service
metadata: {name: dup, namespace: ns}
spec: {clusterIP: 10.0.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dup-se, namespace: ns}
spec: {hosts: [dup.ns.svc.cluster.local], addresses: [10.9.9.9], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: a, namespace: ns}
spec: {hosts: [shared.example.com], addresses: [192.0.2.1, 192.0.2.0/24], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: b, namespace: other}
spec: {hosts: [shared.example.com], addresses: [192.0.2.2, 192.0.2.1], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cidr-only, namespace: ns}
spec: {hosts: [cidr.example.com], addresses: [192.0.2.0/24], resolution: NONE, ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: v1
kind: Service
metadata: {name: no-ip, namespace: ns}
spec: {ports: [{name: http, port: 80}]}
"""


def test_duplicates_cidrs_and_unaddressed() -> None:
    objs = parse_documents(_DOCS, "d.yaml")
    snap = MeshSnapshot(1, {key(o): o for o in objs})
    proxy = ProxyView(node_id="n", ips=("10.1.1.1",), namespace="ns", service_account=None, dns_capture=True)
    t = name_table(snap, proxy, vips={}).table
    assert t["dup.ns.svc.cluster.local"].registry == "Kubernetes"  # the Kubernetes service wins
    assert list(t["dup.ns.svc.cluster.local"].ips) == ["10.0.0.1"]
    assert list(t["shared.example.com"].ips) == ["192.0.2.1", "192.0.2.2"]  # appended, CIDR dropped
    assert "cidr.example.com" not in t
    assert "no-ip.ns.svc.cluster.local" not in t
    assert set(t) == {"dup.ns.svc.cluster.local", "shared.example.com"}


_EXPORT = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: a}
spec: {hosts: [private.example.com], addresses: [192.0.2.5], exportTo: ["."], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: to-b, namespace: a}
spec: {hosts: [to-b.example.com], addresses: [192.0.2.6], exportTo: [b], ports: [{number: 80, name: http, protocol: HTTP}]}
---
apiVersion: v1
kind: Service
metadata: {name: hidden, namespace: a, annotations: {networking.istio.io/exportTo: "~"}}
spec: {clusterIP: 10.0.0.9, ports: [{name: http, port: 80}]}
"""


def test_export_to_limits_visibility() -> None:
    objs = parse_documents(_EXPORT, "e.yaml")
    snap = MeshSnapshot(1, {key(o): o for o in objs})

    def names(ns: str) -> set[str]:
        proxy = ProxyView(node_id="n", ips=("10.1.1.1",), namespace=ns, service_account=None)
        return set(name_table(snap, proxy, vips={}).table)

    assert names("a") == {"private.example.com"}
    assert names("b") == {"to-b.example.com"}
    assert names("c") == set()
