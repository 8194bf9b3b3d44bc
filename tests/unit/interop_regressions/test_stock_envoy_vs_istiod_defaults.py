"""Stock Envoy (vm-agent's) against what a default istiod really pushes, in Envoy's validate mode.

data/default-istiod-{cds,lds}.pb are istiod's DiscoveryResponses, byte for byte, as the interop lab captured
them. istiod ran with its default settings and helm's `defaultProviders.metrics: [prometheus]` (docs/interop.md,
"Stock Envoy and istiod defaults"). The first test pins the gap. The second one shows that removing the
istio-proxy-only filters is enough for stock Envoy to take everything else. That is the rule
the xDS proxy applies (vm_agent.telemetry.rewrite.strip_istio_proxy_filters), tested here through its byte-level
entry point.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from vm_agent.envoy_binary import find_envoy_binary
from vm_agent.telemetry.clusters import ClusterServices, decode_clusters
from vm_agent.telemetry.markers import ALPN_DROPPED, CLUSTER_TYPE_URL, ISTIO_PROXY_ONLY, LISTENER_TYPE_URL
from vm_agent.telemetry.peer import NodeExchange
from vm_agent.telemetry.rewrite import for_stock_envoy, strip_istio_proxy_filters

pytestmark = [pytest.mark.integration]

DATA = Path(__file__).parent / "data"


def without_istio_proxy_filters(
    clusters: list[cluster_pb2.Cluster], listeners: list[listener_pb2.Listener], node: NodeExchange | None = None
) -> dict[str, int]:
    """The xDS proxy's rule (vm_agent.telemetry.rewrite), applied through its byte-level entry point; with a
    node, Istio's filters are replaced by the stock ones, without, only removed."""
    dropped: dict[str, int] = {}
    for items, type_url in ((clusters, CLUSTER_TYPE_URL), (listeners, LISTENER_TYPE_URL)):
        resp = discovery_pb2.DiscoveryResponse(type_url=type_url)
        for item in items:
            resp.resources.add().Pack(item)
        out, counts = for_stock_envoy(resp.SerializeToString(), type_url, delta=False, node=node)
        for kind, n in counts.items():
            dropped[kind] = dropped.get(kind, 0) + n
        stripped = discovery_pb2.DiscoveryResponse.FromString(out)
        for item, any_ in zip(items, stripped.resources, strict=True):
            any_.Unpack(item)
    return dropped


def istiod_resources() -> tuple[list[cluster_pb2.Cluster], list[listener_pb2.Listener]]:
    clusters, listeners = [], []
    for a in discovery_pb2.DiscoveryResponse.FromString((DATA / "default-istiod-cds.pb").read_bytes()).resources:
        c = cluster_pb2.Cluster()
        a.Unpack(c)
        clusters.append(c)
    for a in discovery_pb2.DiscoveryResponse.FromString((DATA / "default-istiod-lds.pb").read_bytes()).resources:
        lis = listener_pb2.Listener()
        a.Unpack(lis)
        listeners.append(lis)
    return clusters, listeners


def envoy_validate(
    tmp_path: Path, clusters: list[cluster_pb2.Cluster], listeners: list[listener_pb2.Listener]
) -> subprocess.CompletedProcess[str]:
    """Envoy --mode validate on a bootstrap that carries istiod's resources statically (binary .pb bootstrap)."""
    b = bootstrap_pb2.Bootstrap()
    b.node.id = "sidecar~127.0.0.2~vm.vm-ns~vm-ns.svc.cluster.local"
    b.node.cluster = "vm-app.vm-ns"
    for name in ("xds-grpc", "sds-grpc"):  # what istiod's resources refer to; validate mode never dials them
        c = b.static_resources.clusters.add(name=name, type=cluster_pb2.Cluster.STATIC)
        c.load_assignment.cluster_name = name
        c.load_assignment.endpoints.add().lb_endpoints.add().endpoint.address.pipe.path = str(tmp_path / name)
    ads = b.dynamic_resources.ads_config
    ads.api_type = ads.GRPC
    ads.transport_api_version = 2  # V3
    ads.grpc_services.add().envoy_grpc.cluster_name = "xds-grpc"
    b.static_resources.clusters.extend(clusters)
    b.static_resources.listeners.extend(listeners)
    path = tmp_path / "bootstrap.pb"
    path.write_bytes(b.SerializeToString())
    return subprocess.run(
        [str(find_envoy_binary()), "--mode", "validate", "-c", str(path), "-l", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_stock_envoy_rejects_a_default_istiods_config(tmp_path: Path) -> None:
    clusters, listeners = istiod_resources()
    assert clusters and listeners
    res = envoy_validate(tmp_path, clusters, listeners)
    assert res.returncode != 0
    assert "Didn't find a registered implementation for 'istio.metadata_exchange'" in res.stderr + res.stdout


def test_stock_envoy_takes_the_rest_once_istio_proxy_filters_are_dropped(tmp_path: Path) -> None:
    clusters, listeners = istiod_resources()
    dropped = without_istio_proxy_filters(clusters, listeners)
    assert set(dropped) == {*ISTIO_PROXY_ONLY, ALPN_DROPPED}, dropped  # all four occur in a default istiod's push
    res = envoy_validate(tmp_path, clusters, listeners)
    assert res.returncode == 0, res.stderr[-2000:]


def test_stock_envoy_takes_istiods_config_with_istios_filters_replaced(tmp_path: Path) -> None:
    """What the agent really forwards: exchange, ALPN hint and metrics as stock filters; Envoy validates it."""
    clusters, listeners = istiod_resources()
    node = NodeExchange("sidecar~127.0.0.2~vm.vm-ns~vm-ns.svc.cluster.local", "Cg0KBE5BTUUSBRoDdm0x")
    rewritten = without_istio_proxy_filters(clusters, listeners, node)
    assert set(rewritten) == {*ISTIO_PROXY_ONLY, ALPN_DROPPED}
    text = "".join(str(x) for x in [*clusters, *listeners])
    for stock in ("header_mutation", "header_to_metadata", "set_filter_state", "access_loggers.stats"):
        assert stock in text, stock
    res = envoy_validate(tmp_path, clusters, listeners)
    assert res.returncode == 0, res.stderr[-2000:]


def test_delta_response_is_stripped_and_untouched_responses_keep_their_bytes() -> None:
    clusters, _ = istiod_resources()
    delta = discovery_pb2.DeltaDiscoveryResponse(type_url=CLUSTER_TYPE_URL, nonce="n1", system_version_info="v")
    for c in clusters:
        r = delta.resources.add(name=c.name, version="h")
        r.resource.Pack(c)
    raw = delta.SerializeToString()
    out, dropped = strip_istio_proxy_filters(raw, CLUSTER_TYPE_URL, delta=True)
    assert dropped
    assert b"MetadataExchange" not in out
    parsed = discovery_pb2.DeltaDiscoveryResponse.FromString(out)
    assert parsed.nonce == "n1"
    assert [r.name for r in parsed.resources] == [c.name for c in clusters]
    # Nothing to strip (or not LDS/CDS): the very same bytes go to Envoy.
    again, none = strip_istio_proxy_filters(out, CLUSTER_TYPE_URL, delta=True)
    assert again is out
    assert none == {}
    eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
    assert strip_istio_proxy_filters(raw, eds, delta=True)[0] is raw


def _hcms(lis: listener_pb2.Listener) -> list[tuple[listener_pb2.FilterChain, hcm_pb2.HttpConnectionManager]]:
    out = []
    for fc in lis.filter_chains:
        for f in fc.filters:
            if f.typed_config.type_url.endswith("HttpConnectionManager"):
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                out.append((fc, hcm))
    return out


def _hints(listeners: list[listener_pb2.Listener]) -> list[tuple[bool, bool]]:
    """(outbound chain that sniffs?, has the hint) for every outbound HCM that istiod gave istio.alpn."""
    out = []
    for lis in listeners:
        for fc, hcm in _hcms(lis):
            names = [h.name for h in hcm.http_filters]
            if lis.traffic_direction == base_pb2.OUTBOUND and "istio.alpn" in names:
                out.append((bool(fc.filter_chain_match.application_protocols), "istio.metadata_exchange" in names))
    return out


def test_alpn_hint_goes_only_where_a_peer_sniffs_the_protocol() -> None:
    """istiod's outbound HTTP chain of a sniffing port (the ALPNs the HTTP inspector finds) keeps the hint; the same
    chain as istiod builds it for a declared HTTP port (no ALPNs to match) gets none: the peer's declared HTTP
    chains accept the plain "istio" ALPN (inbound chain in the same push: istio, istio-peer-exchange, istio-http/*)."""
    node = NodeExchange("sidecar~127.0.0.2~vm.ns~ns.svc.cluster.local", "x")
    clusters, listeners = istiod_resources()
    sniffing = [lis for lis in listeners if any(s for s, _ in _hints([lis]))]
    assert sniffing, "istiod's push has a sniffing outbound HTTP chain"
    declared = []
    for lis in sniffing:
        copy = listener_pb2.Listener()
        copy.CopyFrom(lis)
        for fc in copy.filter_chains:
            del fc.filter_chain_match.application_protocols[:]
        declared.append(copy)
    without_istio_proxy_filters(clusters, sniffing + declared, node)

    def has_hint(lis: listener_pb2.Listener) -> bool:
        return any(h.name == "istio.alpn" for _, hcm in _hcms(lis) for h in hcm.http_filters)

    assert all(has_hint(lis) for lis in sniffing)
    assert not any(has_hint(lis) for lis in declared)
    inbound_alpns = {
        p for lis in listeners for fc in lis.filter_chains for p in fc.filter_chain_match.application_protocols
    }
    assert "istio" in inbound_alpns


def test_cluster_services_are_learnt_from_istiods_cds() -> None:
    """The metrics' destination_service labels come from here (the raw stat tag names the cluster only)."""
    raw = (DATA / "default-istiod-cds.pb").read_bytes()
    services = ClusterServices()
    sotw, removed, clusters = decode_clusters(raw, delta=False)
    services.learn(clusters)
    assert sotw and not removed
    named = [c.name for c in clusters if c.name.startswith("outbound|") and "istio" in c.metadata.filter_metadata]
    assert named
    for cluster in clusters:
        if cluster.name not in named:
            continue
        # What Envoy's %CLUSTER_METADATA(istio:services)% printed, read here the protobuf library's way.
        expected = json_format.MessageToDict(cluster.metadata.filter_metadata["istio"])["services"]
        assert json.loads(services(cluster.name)) == expected, cluster.name
        assert expected[0]["host"] == cluster.name.split("|")[3]
    assert services("outbound|1||nowhere.example") == ""


def test_inbound_chains_format_the_requests_facts_once() -> None:
    """On istiod's inbound HTTP chains the request's facts are formatted once into filter state, before any other
    filter; the router removes the caller's exchange headers; each stat reads the captured facts and names the
    chain's only cluster as a literal. The outbound chains keep their per-stat facts and the answer capture."""
    from vm_agent.telemetry import filters

    node = NodeExchange("sidecar~127.0.0.2~vm.ns~ns.svc.cluster.local", "x")
    clusters, listeners = istiod_resources()
    without_istio_proxy_filters(clusters, listeners, node)
    inbound = outbound = 0
    for lis in listeners:
        for _, hcm in _hcms(lis):
            if not hcm.access_log:
                continue
            tag = json_format.MessageToDict(hcm.access_log[0].typed_config)["value"]["histograms"][0]["stat"]["tags"][0]
            names = [h.name for h in hcm.http_filters]
            if lis.traffic_direction == base_pb2.INBOUND:
                inbound += 1
                assert names[0] == "istio.stats.request", names
                assert "istio.metadata_exchange.discovery" not in names  # no metadata rule inbound any more
                assert set(filters.PEER_HEADERS) <= set(hcm.route_config.request_headers_to_remove)
                (cluster,) = {r.route.cluster for vh in hcm.route_config.virtual_hosts for r in vh.routes}
                assert tag["value_format"].endswith(
                    f"{cluster}\x1f\x1f\x1f\x1f%FILTER_STATE(istio.stats.request:PLAIN)%"
                )
                capture = json_format.MessageToDict(hcm.http_filters[0].typed_config, preserving_proto_field_name=True)
                capture = capture["on_request_headers"][0]
                assert "%REQ(x-envoy-peer-metadata)%" in capture["format_string"]["text_format_source"]["inline_string"]
            else:
                outbound += 1
                assert "istio.stats.request" not in names
                assert "%DYNAMIC_METADATA(io.istio.peer.upstream:metadata)%" in tag["value_format"]
                assert "LOCAL_URI_SAN" not in tag["value_format"]  # the agent fills our own SAN in
    assert inbound and outbound


def test_native_stats_filter_takes_istiods_http_chains(tmp_path: Path) -> None:
    """With the native stats filter (vm_agent.telemetry.native), every HTTP chain istiod gives metrics counts with it,
    first in the chain: no stats access log, no inbound capture, no outbound metadata rule (the filter takes the
    answer). TCP chains keep their access logs. The shipped Envoy validates it, which loads the module and runs its
    configuration hook (it rejects a configuration that names no reporter)."""
    from vm_agent.telemetry.native import NativeStats
    from vm_agent.telemetry.native.build import build

    module = build(require=True)
    assert module is not None
    stats = NativeStats(str(module), str(tmp_path / "istio-stats.prom"))
    node = NodeExchange("sidecar~127.0.0.2~vm.ns~ns.svc.cluster.local", "x")
    clusters, listeners = istiod_resources()
    resp = discovery_pb2.DiscoveryResponse(type_url=LISTENER_TYPE_URL)
    for item in listeners:
        resp.resources.add().Pack(item)
    out, _ = for_stock_envoy(resp.SerializeToString(), LISTENER_TYPE_URL, delta=False, node=node, native=stats)
    for item, any_ in zip(listeners, discovery_pb2.DiscoveryResponse.FromString(out).resources, strict=True):
        any_.Unpack(item)
    without_istio_proxy_filters(clusters, [], node)
    counted = {"destination": 0, "source": 0}
    for lis in listeners:
        for _, hcm in _hcms(lis):
            names = [h.name for h in hcm.http_filters]
            if "istio.stats" not in names:
                continue
            assert names[0] == "istio.stats", names
            assert not hcm.access_log
            assert "istio.stats.request" not in names
            assert "istio.metadata_exchange.discovery" not in names
            config = json_format.MessageToDict(hcm.http_filters[0].typed_config)["value"]
            assert config["dynamic_module_config"]["module"]["local"]["filename"] == str(module)
            reporter, _, export = config["filter_config"]["value"].partition("|")
            assert export == stats.export
            assert reporter == ("destination" if lis.traffic_direction == base_pb2.INBOUND else "source")
            counted[reporter] += 1
    assert all(counted.values()), counted
    res = envoy_validate(tmp_path, clusters, listeners)
    assert res.returncode == 0, res.stderr[-2000:]

    # A configuration the module refuses is refused by Envoy, so a broken rewrite cannot pass unnoticed.
    for lis in listeners:
        for fc in lis.filter_chains:
            for f in fc.filters:
                if not f.typed_config.type_url.endswith("HttpConnectionManager"):
                    continue
                hcm = hcm_pb2.HttpConnectionManager()
                f.typed_config.Unpack(hcm)
                for h in hcm.http_filters:
                    if h.name == "istio.stats":
                        d = json_format.MessageToDict(h.typed_config)
                        d["value"]["filter_config"]["value"] = "nobody"
                        json_format.ParseDict(d, h.typed_config)
                f.typed_config.Pack(hcm)
    res = envoy_validate(tmp_path, clusters, listeners)
    assert res.returncode != 0
