"""Generated Envoy resources: names, ports, SDS references and SAN matchers, in both interception modes."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
from typing import Any

import pytest
from google.protobuf import json_format

from vm_agent.mesh.model import MeshSnapshot, ServiceEntry, key, parse_documents
from vm_agent.mesh.xdsgen import (
    CLUSTER_TYPE_URL,
    ENDPOINT_TYPE_URL,
    LISTENER_TYPE_URL,
    ROUTE_TYPE_URL,
    ProxyView,
    allocate_vips,
    generate,
    ipv6_vip,
)

TD = "example.org"
VM = "vm-app.vm-ns.svc.cluster.local"
DB = "db.vm-ns.svc.cluster.local"


def _json(resources: dict[str, dict[str, Any]], type_url: str) -> dict[str, dict[str, Any]]:
    out = {}
    for name, packed in resources[type_url].items():
        assert packed.type_url == type_url
        out[name] = json_format.MessageToDict(packed, preserving_proto_field_name=True)
    return out


def _gen(snapshot: MeshSnapshot, proxy: ProxyView) -> dict[str, dict[str, dict[str, Any]]]:
    res = generate(snapshot, proxy, trust_domain=TD, vips=allocate_vips(snapshot, {}))
    return {t: _json(res, t) for t in (CLUSTER_TYPE_URL, ENDPOINT_TYPE_URL, LISTENER_TYPE_URL, ROUTE_TYPE_URL)}


def _addrs(cla: dict[str, Any]) -> list[tuple[str, int]]:
    return [
        (
            lb["endpoint"]["address"]["socket_address"]["address"],
            lb["endpoint"]["address"]["socket_address"]["port_value"],
        )
        for group in cla.get("endpoints", [])
        for lb in group["lb_endpoints"]
    ]


def _sds_names(ctx: dict[str, Any]) -> tuple[list[str], str, list[str]]:
    common = ctx["common_tls_context"]
    certs = [c["name"] for c in common["tls_certificate_sds_secret_configs"]]
    root = common["combined_validation_context"]["validation_context_sds_secret_config"]
    clusters = [
        g["envoy_grpc"]["cluster_name"]
        for c in [*common["tls_certificate_sds_secret_configs"], root]
        for g in c["sds_config"]["api_config_source"]["grpc_services"]
    ]
    return certs, root["name"], clusters


def test_cluster_names_like_istiod(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    out = _gen(snapshot, vm_proxy)
    clusters = out[CLUSTER_TYPE_URL]
    for name in (
        "BlackHoleCluster",
        "PassthroughCluster",
        "InboundPassthroughCluster",
        "inbound|8080||",
        f"outbound|80||{VM}",
        f"outbound|5432||{DB}",
        "outbound|9090||grpc-api.other.svc.cluster.local",
        "outbound|443||api.example.internal",
        "outbound|3306||legacy.example.internal",
        "outbound|8080||vm-internal.mesh",
    ):
        assert name in clusters, sorted(clusters)
    assert clusters["PassthroughCluster"]["type"] == "ORIGINAL_DST"
    assert clusters["InboundPassthroughCluster"]["upstream_bind_config"]["source_address"]["address"] == "127.0.0.6"
    assert clusters[f"outbound|80||{VM}"]["type"] == "EDS"
    assert clusters[f"outbound|80||{VM}"]["eds_cluster_config"]["service_name"] == f"outbound|80||{VM}"
    dns = clusters["outbound|443||api.example.internal"]
    assert dns["type"] == "STRICT_DNS"
    assert dns["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "api.example.internal",
        "port_value": 443,
    }
    assert "transport_socket_matches" not in dns  # external: the app does its own TLS
    assert clusters["outbound|443||*.wild.example"]["type"] == "ORIGINAL_DST"
    grpc = clusters["outbound|9090||grpc-api.other.svc.cluster.local"]
    assert "http2_protocol_options" in json.dumps(grpc)


def test_endpoints_exclude_unhealthy_and_unchecked(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    eds = _gen(snapshot, vm_proxy)[ENDPOINT_TYPE_URL]
    # db-2 has Healthy=False; vm-app-127.0.0.5 is health-checked without any condition yet.
    assert _addrs(eds[f"outbound|5432||{DB}"]) == [("127.0.0.3", 5432)]
    assert _addrs(eds[f"outbound|80||{VM}"]) == [("127.0.0.2", 8080)]  # WorkloadEntry port by name
    assert _addrs(eds["outbound|8080||vm-internal.mesh"]) == [("127.0.0.2", 8080)]
    assert _addrs(eds["outbound|3306||legacy.example.internal"]) == [("192.0.2.11", 3306)]
    empty = eds["outbound|9090||grpc-api.other.svc.cluster.local"]
    assert empty["cluster_name"] == "outbound|9090||grpc-api.other.svc.cluster.local"
    assert "endpoints" not in empty  # sent anyway: Envoy waits for every EDS cluster's assignment
    lb = eds[f"outbound|5432||{DB}"]["endpoints"][0]["lb_endpoints"][0]
    assert lb["metadata"]["filter_metadata"]["envoy.transport_socket_match"] == {"tlsMode": "istio"}
    legacy = eds["outbound|3306||legacy.example.internal"]["endpoints"][0]["lb_endpoints"][0]
    # A plain ServiceEntry endpoint is not a mesh workload (no mTLS), but istiod still labels it for telemetry.
    assert legacy["metadata"]["filter_metadata"] == {"istio": {"workload": "legacy;vm-ns;legacy;;Kubernetes"}}


def test_recovering_endpoint_comes_back(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    objs = dict(snapshot.objects)
    we = objs[("WorkloadEntry", "vm-ns", "db-2")]
    objs[("WorkloadEntry", "vm-ns", "db-2")] = dataclasses.replace(we, conditions=())  # type: ignore[arg-type]
    eds = _gen(MeshSnapshot(2, objs), vm_proxy)[ENDPOINT_TYPE_URL]
    assert sorted(_addrs(eds[f"outbound|5432||{DB}"])) == [("127.0.0.3", 5432), ("127.0.0.4", 5432)]


def test_upstream_mtls_uses_sds_and_san_of_endpoints(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    db = _gen(snapshot, vm_proxy)[CLUSTER_TYPE_URL][f"outbound|5432||{DB}"]
    matches = {m["name"]: m for m in db["transport_socket_matches"]}
    assert matches["tlsMode-istio"]["match"] == {"tlsMode": "istio"}
    tls = matches["tlsMode-istio"]["transport_socket"]["typed_config"]
    assert tls["@type"].endswith("UpstreamTlsContext")
    assert tls["sni"] == f"outbound_.5432_._.{DB}"
    certs, root, sds_clusters = _sds_names(tls)
    assert certs == ["default"]
    assert root == "ROOTCA"
    assert set(sds_clusters) == {"sds-grpc"}
    sans = tls["common_tls_context"]["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"
    ]
    assert sans == [{"san_type": "URI", "matcher": {"exact": f"spiffe://{TD}/ns/vm-ns/sa/db-sa"}}]
    assert tls["common_tls_context"]["alpn_protocols"] == ["istio-peer-exchange", "istio"]
    assert matches["tlsMode-disabled"]["match"] == {}


def test_redirect_listeners(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    out = _gen(snapshot, vm_proxy)
    lds = out[LISTENER_TYPE_URL]
    vo = lds["virtualOutbound"]
    assert vo["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 15001}
    assert vo["use_original_dst"] is True
    vi = lds["virtualInbound"]
    assert vi["address"]["socket_address"]["port_value"] == 15006
    assert [f["name"] for f in vi["listener_filters"]] == [
        "envoy.filters.listener.original_dst",
        "envoy.filters.listener.tls_inspector",
    ]
    chains = {c["name"]: c for c in vi["filter_chains"]}
    inbound = chains["inbound|8080||"]
    assert inbound["filter_chain_match"] == {"destination_port": 8080, "transport_protocol": "tls"}
    dtls = inbound["transport_socket"]["typed_config"]
    assert dtls["require_client_certificate"] is True
    assert dtls["common_tls_context"]["alpn_protocols"] == ["istio-peer-exchange", "istio", "h2", "http/1.1"]
    certs, root, sds_clusters = _sds_names(dtls)
    assert (certs, root, set(sds_clusters)) == (["default"], "ROOTCA", {"sds-grpc"})
    hcm = inbound["filters"][0]["typed_config"]
    assert hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] == "inbound|8080||"
    assert hcm["forward_client_cert_details"] == "APPEND_FORWARD"
    assert "virtualInbound-catchall-tcp" in chains
    http80 = lds["0.0.0.0_80"]
    assert http80["bind_to_port"] is False
    assert http80["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["route_config_name"] == "80"
    tcp = lds["10.96.0.11_5432"]
    assert tcp["bind_to_port"] is False
    assert tcp["filter_chains"][0]["filters"][-1]["typed_config"]["cluster"] == f"outbound|5432||{DB}"
    assert "192.0.2.10_3306" in lds
    vip = allocate_vips(snapshot, {})["api.example.internal"]
    assert f"{vip}_443" in lds  # DNS capture: auto-allocated VIP gets a listener
    assert all(not n.startswith("127.0.0.1_") for n in lds)


def test_redirect_without_dns_capture_matches_tls_by_sni(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    lds = _gen(snapshot, dataclasses.replace(vm_proxy, dns_capture=False))[LISTENER_TYPE_URL]
    assert not any(n.startswith("240.240.") for n in lds)
    chains = lds["0.0.0.0_443"]["filter_chains"]
    assert chains[0]["filter_chain_match"]["server_names"] == ["api.example.internal"]
    assert chains[-1]["filters"][-1]["typed_config"]["cluster"] == "PassthroughCluster"


def test_routes_name_every_form_of_the_host(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    rds = _gen(snapshot, vm_proxy)[ROUTE_TYPE_URL]
    assert set(rds) == {"80", "8080", "9090"}
    vhosts = {v["name"]: v for v in rds["80"]["virtual_hosts"]}
    domains = vhosts[f"{VM}:80"]["domains"]
    for d in (VM, f"{VM}:80", "vm-app", "vm-app:80", "vm-app.vm-ns", "vm-app.vm-ns.svc", "10.96.0.10", "10.96.0.10:80"):
        assert d in domains
    assert vhosts[f"{VM}:80"]["routes"][0]["route"]["cluster"] == f"outbound|80||{VM}"
    assert vhosts["allow_any"]["domains"] == ["*"]
    assert vhosts["allow_any"]["routes"][0]["route"]["cluster"] == "PassthroughCluster"
    other = {v["name"]: v for v in rds["9090"]["virtual_hosts"]}["grpc-api.other.svc.cluster.local:9090"]
    assert "grpc-api" not in other["domains"]  # short name only within the proxy's namespace
    assert "grpc-api.other" in other["domains"]
    all_domains = [d for v in rds["8080"]["virtual_hosts"] for d in v["domains"]]
    assert len(all_domains) == len(set(all_domains))


def test_none_mode_binds_real_addresses(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    out = _gen(snapshot, dataclasses.replace(vm_proxy, interception_mode="NONE"))
    lds, cds = out[LISTENER_TYPE_URL], out[CLUSTER_TYPE_URL]
    assert "virtualInbound" not in lds
    assert "virtualOutbound" not in lds
    inbound = lds["127.0.0.2_8080"]
    assert inbound["address"]["socket_address"] == {"address": "127.0.0.2", "port_value": 8080}
    assert inbound["filter_chains"][0]["transport_socket"]["typed_config"]["require_client_certificate"] is True
    local = cds["inbound|8080||"]
    assert local["type"] == "STATIC"
    assert local["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 8080,
    }
    db = lds["127.0.0.1_5432"]
    assert db["filter_chains"][0]["filters"][-1]["typed_config"]["cluster"] == f"outbound|5432||{DB}"
    assert "bind_to_port" not in db
    # Its own services (vm-app:80, vm-internal.mesh:8080) and its app's port are not bound on loopback.
    assert "127.0.0.1_80" not in lds
    assert "127.0.0.1_8080" not in lds
    grpc = lds["127.0.0.1_9090"]
    assert grpc["filter_chains"][0]["filters"][0]["typed_config"]["rds"]["route_config_name"] == "9090"
    rds = out[ROUTE_TYPE_URL]["9090"]
    fallback = {v["name"]: v for v in rds["virtual_hosts"]}["allow_any"]
    assert fallback["routes"][0]["route"]["cluster"] == "outbound|9090||grpc-api.other.svc.cluster.local"


def test_pending_auto_registration_uses_group_template(snapshot: MeshSnapshot) -> None:
    proxy = ProxyView(
        node_id="n",
        ips=("127.0.0.9",),
        namespace="vm-ns",
        service_account="vm-sa",
        metadata={"AUTO_REGISTER_GROUP": "vm-app"},
        interception_mode="NONE",
    )
    lds = _gen(snapshot, proxy)[LISTENER_TYPE_URL]
    assert "127.0.0.9_8080" in lds


def test_proxy_without_workload_gets_no_inbound(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    out = _gen(snapshot, dataclasses.replace(vm_proxy, ips=("127.0.0.99",)))
    assert not any(n.startswith("inbound|") for n in out[CLUSTER_TYPE_URL])
    chains = [c["name"] for c in out[LISTENER_TYPE_URL]["virtualInbound"]["filter_chains"]]
    assert chains == ["virtualInbound-blackhole", "virtualInbound-catchall-tcp"]


def test_bad_interception_mode(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    with pytest.raises(ValueError, match="interception_mode: expected REDIRECT, TPROXY or NONE, got 'EBPF'"):
        generate(snapshot, dataclasses.replace(vm_proxy, interception_mode="EBPF"), trust_domain=TD, vips={})


def test_tproxy_marks_inbound_transparent(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    lds = _gen(snapshot, dataclasses.replace(vm_proxy, interception_mode="TPROXY"))[LISTENER_TYPE_URL]
    assert lds["virtualInbound"]["transparent"] is True
    assert "transparent" not in _gen(snapshot, vm_proxy)[LISTENER_TYPE_URL]["virtualInbound"]


def _se(host: str, *, resolution: str = "DNS", addresses: str = "") -> str:
    return (
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n"
        f"metadata: {{name: {host.replace('*', 'w').replace('.', '-')}, namespace: ns}}\n"
        f"spec: {{hosts: ['{host}'], resolution: {resolution}{addresses}, ports: [{{number: 80, name: http, protocol: HTTP}}]}}\n"
    )


def _snap(*docs: str) -> MeshSnapshot:
    objs = parse_documents("---\n".join(docs), "t.yaml")
    return MeshSnapshot(1, {key(o): o for o in objs})


def test_vips_stable_and_in_range() -> None:
    hosts = [f"h{i}.example.com" for i in range(50)]
    snap = _snap(*(_se(h) for h in hosts))
    first = allocate_vips(snap, {})
    assert sorted(first) == sorted(hosts)
    assert len(set(first.values())) == 50
    for v in first.values():
        assert ipaddress.ip_address(v) in ipaddress.ip_network("240.240.0.0/16")
        assert not v.endswith((".0", ".255"))
    assert allocate_vips(snap, first) == first
    assert allocate_vips(snap, {}) == first  # deterministic without history too
    # Adding hosts never moves existing ones; removing a host frees only its own address.
    bigger = allocate_vips(_snap(*(_se(h) for h in [*hosts, "new.example.com"])), first)
    assert {h: bigger[h] for h in hosts} == first
    smaller = allocate_vips(_snap(*(_se(h) for h in hosts[1:])), first)
    assert "h0.example.com" not in smaller
    assert {h: smaller[h] for h in hosts[1:]} == {h: first[h] for h in hosts[1:]}


def test_vips_keep_previous_even_if_hash_differs() -> None:
    snap = _snap(_se("a.example.com"), _se("b.example.com"))
    prev = {"a.example.com": "240.240.7.7"}
    out = allocate_vips(snap, prev)
    assert out["a.example.com"] == "240.240.7.7"
    assert out["b.example.com"] != "240.240.7.7"


def test_vips_skip_addressed_wildcard_and_passthrough() -> None:
    snap = _snap(
        _se("addressed.example.com", addresses=", addresses: [192.0.2.1]"),
        _se("*.wild.example.com", resolution="NONE"),
        _se("pass.example.com", resolution="NONE"),
        _se("static.example.com", resolution="STATIC"),
    )
    assert list(allocate_vips(snap, {})) == ["static.example.com"]
    assert len(snap.of_kind(ServiceEntry)) == 4


def test_ipv6_twin() -> None:
    assert ipv6_vip("240.240.1.2") == "2001:2::102"
    assert ipaddress.ip_address(ipv6_vip("240.240.255.254")) in ipaddress.ip_network("2001:2::/48")


def test_generation_is_deterministic(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    """Same snapshot, same bytes: the server can version resources by their serialized form."""
    vips = allocate_vips(snapshot, {})
    first = generate(snapshot, vm_proxy, trust_domain=TD, vips=vips)
    first[CLUSTER_TYPE_URL]["BlackHoleCluster"].value = b"tampered"  # callers own what they get
    again = generate(MeshSnapshot(2, dict(snapshot.objects)), vm_proxy, trust_domain=TD, vips=vips)
    first = generate(snapshot, vm_proxy, trust_domain=TD, vips=vips)
    assert {t: {n: a.value for n, a in r.items()} for t, r in first.items()} == {
        t: {n: a.value for n, a in r.items()} for t, r in again.items()
    }


def test_export_to_hides_clusters_from_other_namespaces(snapshot: MeshSnapshot, vm_proxy: ProxyView) -> None:
    objs = dict(snapshot.objects)
    k = ("ServiceEntry", "vm-ns", "legacy")
    se = objs[k]
    assert isinstance(se, ServiceEntry)
    objs[k] = dataclasses.replace(se, export_to=(".",))
    snap = MeshSnapshot(2, objs)
    assert "outbound|3306||legacy.example.internal" in _gen(snap, vm_proxy)[CLUSTER_TYPE_URL]
    elsewhere = _gen(snap, dataclasses.replace(vm_proxy, namespace="other"))[CLUSTER_TYPE_URL]
    assert "outbound|3306||legacy.example.internal" not in elsewhere
    assert "outbound|80||vm-app.vm-ns.svc.cluster.local" in elsewhere


def test_port_protocols_from_name_and_app_protocol() -> None:
    snap = _snap(
        "apiVersion: v1\nkind: Service\nmetadata: {name: p, namespace: ns}\n"
        "spec: {clusterIP: 10.0.0.5, ports: ["
        "{name: dns, port: 53, protocol: UDP}, {name: http2-api, port: 81}, {name: web, port: 82, appProtocol: http},"
        " {name: tcp-x, port: 83}, {name: grpc-web, port: 84}]}\n"
    )
    proxy = ProxyView(node_id="n", ips=("10.1.1.1",), namespace="ns", service_account=None)
    out = _gen(snap, proxy)
    cds, lds = out[CLUSTER_TYPE_URL], out[LISTENER_TYPE_URL]
    host = "p.ns.svc.cluster.local"
    assert f"outbound|53||{host}" not in cds  # UDP bypasses the sidecar
    assert "http2_protocol_options" in json.dumps(cds[f"outbound|81||{host}"])
    assert "http2_protocol_options" in json.dumps(cds[f"outbound|84||{host}"])
    assert "http2_protocol_options" not in json.dumps(cds[f"outbound|82||{host}"])
    assert set(out[ROUTE_TYPE_URL]) == {"81", "82", "84"}
    assert "10.0.0.5_83" in lds
