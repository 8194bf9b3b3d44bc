"""Which routes get the ALPN hint turned off: those to clusters istiod marks alpn_override "false" (CDS, then RDS)."""

from __future__ import annotations

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from vm_agent.telemetry.alpn import ALPN_FILTER, CLUSTER_TYPE_URL, ROUTE_TYPE_URL, AlpnExceptions

OWN_TLS = "outbound|443||api.example.com"
MESH = "outbound|80||forum.forum.svc.cluster.local"


def cluster(name: str, own_tls: bool) -> cluster_pb2.Cluster:
    md = {"istio": {"alpn_override": "false"}} if own_tls else {"istio": {"services": [{"host": "x"}]}}
    return json_format.ParseDict({"name": name, "metadata": {"filter_metadata": md}}, cluster_pb2.Cluster())


def delta_cds(*clusters: cluster_pb2.Cluster, removed: tuple[str, ...] = ()) -> bytes:
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=CLUSTER_TYPE_URL, removed_resources=list(removed))
    for c in clusters:
        resp.resources.add(name=c.name).resource.Pack(c)
    return bytes(resp.SerializeToString())


def delta_rds() -> bytes:
    rc = json_format.ParseDict(
        {
            "name": "443",
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {"match": {"prefix": "/own"}, "route": {"cluster": OWN_TLS}},
                        {
                            "match": {"prefix": "/split"},
                            "route": {
                                "weighted_clusters": {
                                    "clusters": [{"name": OWN_TLS, "weight": 50}, {"name": MESH, "weight": 50}]
                                }
                            },
                        },
                        {"match": {"prefix": "/"}, "route": {"cluster": MESH}},
                    ],
                }
            ],
        },
        route_pb2.RouteConfiguration(),
    )
    resp = discovery_pb2.DeltaDiscoveryResponse(type_url=ROUTE_TYPE_URL)
    resp.resources.add(name="443").resource.Pack(rc)
    return bytes(resp.SerializeToString())


def disabled_routes(message: bytes) -> list[str]:
    resp = discovery_pb2.DeltaDiscoveryResponse.FromString(message)
    rc = route_pb2.RouteConfiguration()
    resp.resources[0].resource.Unpack(rc)
    return [r.match.prefix for vh in rc.virtual_hosts for r in vh.routes if ALPN_FILTER in r.typed_per_filter_config]


def test_routes_to_own_tls_clusters_lose_the_hint_others_keep_it() -> None:
    ex = AlpnExceptions()
    ex.learn(delta_cds(cluster(OWN_TLS, True), cluster(MESH, False)), delta=True)
    assert ex.clusters == {OWN_TLS}
    assert disabled_routes(ex.apply(delta_rds(), delta=True)) == ["/own", "/split"]


def test_nothing_to_do_leaves_the_bytes_alone() -> None:
    ex = AlpnExceptions()
    ex.learn(delta_cds(cluster(MESH, False)), delta=True)
    rds = delta_rds()
    assert ex.apply(rds, delta=True) is rds


def test_a_cluster_that_drops_the_mark_or_goes_away_is_forgotten() -> None:
    ex = AlpnExceptions()
    ex.learn(delta_cds(cluster(OWN_TLS, True)), delta=True)
    ex.learn(delta_cds(cluster(OWN_TLS, False)), delta=True)
    assert ex.clusters == set()
    ex.learn(delta_cds(cluster(OWN_TLS, True)), delta=True)
    ex.learn(delta_cds(removed=(OWN_TLS,)), delta=True)
    assert ex.clusters == set()


def test_state_of_the_world_cds_replaces_what_was_known() -> None:
    ex = AlpnExceptions()
    ex.learn(delta_cds(cluster(OWN_TLS, True)), delta=True)
    sotw = discovery_pb2.DiscoveryResponse(type_url=CLUSTER_TYPE_URL)
    sotw.resources.add().Pack(cluster("other-own-tls", True))
    ex.learn(sotw.SerializeToString(), delta=False)
    assert ex.clusters == {"other-own-tls"}
