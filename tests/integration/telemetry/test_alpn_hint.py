"""Real Envoy: the stock stand-in for istio.alpn offers ``istio-http/1.1`` upstream, never to a cluster istiod marks
``istio.alpn_override: "false"`` (the user's own TLS): the agent turns the hint off on the routes to it.

A pod's inbound listener picks its HTTP chain on ports with protocol sniffing from that hint. The upstream here
is a TLS server that prefers the hints and records what was negotiated.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

from tests.helpers.net import free_port
from tests.integration.mesh_xdsgen.support import MeshCa, running_envoy
from vm_agent.telemetry import filters
from vm_agent.telemetry.alpn import CLUSTER_TYPE_URL, ROUTE_TYPE_URL, AlpnExceptions

pytestmark = [pytest.mark.integration]


@contextlib.contextmanager
def tls_upstream(tmp: Path) -> Iterator[tuple[int, list[str | None]]]:
    ca = MeshCa()
    svid = ca.issue("spiffe://cluster.local/ns/pods/sa/server")
    (tmp / "s.crt").write_bytes(svid.chain_pem)
    (tmp / "s.key").write_bytes(svid.key_pem)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp / "s.crt", tmp / "s.key")
    ctx.set_alpn_protocols(["istio-http/1.1", "istio-h2", "istio"])
    srv = socket.create_server(("127.0.0.1", 0))
    seen: list[str | None] = []
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                seen.append(tls.selected_alpn_protocol())
                tls.recv(65536)
                tls.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1], seen
    finally:
        stop.set()
        t.join(5)
        srv.close()


def _cluster(name: str, port: int, metadata: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "metadata": {"filter_metadata": metadata},
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            # What istiod's mesh cluster offers once the xDS proxy dropped the exchange ALPN.
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {"alpn_protocols": ["istio"]},
            },
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }


def _through_the_agent(clusters: list[dict[str, Any]], routes: list[dict[str, Any]]) -> dict[str, Any]:
    """The route configuration as the agent forwards it, having seen the clusters in CDS first."""
    exceptions = AlpnExceptions()
    cds = discovery_pb2.DiscoveryResponse(type_url=CLUSTER_TYPE_URL)
    for c in clusters:
        cds.resources.add().Pack(json_format.ParseDict(c, cluster_pb2.Cluster()))
    exceptions.learn(cds.SerializeToString(), delta=False)
    rc = {"name": "80", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]}
    rds = discovery_pb2.DiscoveryResponse(type_url=ROUTE_TYPE_URL)
    rds.resources.add().Pack(json_format.ParseDict(rc, route_pb2.RouteConfiguration()))
    out = discovery_pb2.DiscoveryResponse.FromString(exceptions.apply(rds.SerializeToString(), delta=False))
    rewritten = route_pb2.RouteConfiguration()
    out.resources[0].Unpack(rewritten)
    return json_format.MessageToDict(rewritten, preserving_proto_field_name=True)


def test_hint_on_mesh_clusters_only(tmp_path: Path) -> None:
    listen, admin = free_port(), free_port()
    with tls_upstream(tmp_path) as (port, seen):
        clusters = [
            _cluster("mesh", port, {"istio": {"services": [{"host": "s.pods.svc.cluster.local"}]}}),
            # istiod's mark on a cluster with the user's own TLS (DestinationRule SIMPLE/MUTUAL).
            _cluster("external", port, {"istio": {"external": True, "alpn_override": "false"}}),
        ]
        route_config = _through_the_agent(
            clusters,
            [
                {"match": {"prefix": "/external"}, "route": {"cluster": "external"}},
                {"match": {"prefix": "/"}, "route": {"cluster": "mesh"}},
            ],
        )
        boot = {
            "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "clusters": clusters,
                "listeners": [
                    {
                        "name": "out",
                        "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                        "filter_chains": [
                            {
                                "filters": [
                                    {
                                        "name": "envoy.filters.network.http_connection_manager",
                                        "typed_config": {
                                            "@type": "type.googleapis.com/envoy.extensions.filters.network"
                                            ".http_connection_manager.v3.HttpConnectionManager",
                                            "stat_prefix": "out",
                                            "route_config": route_config,
                                            "http_filters": [
                                                filters.alpn_hint(),
                                                {
                                                    "name": "envoy.filters.http.router",
                                                    "typed_config": {
                                                        "@type": "type.googleapis.com/envoy.extensions.filters.http"
                                                        ".router.v3.Router"
                                                    },
                                                },
                                            ],
                                        },
                                    }
                                ]
                            }
                        ],
                    }
                ],
            },
        }
        with running_envoy(boot, tmp_path):
            for path in ("/mesh", "/external"):
                with urllib.request.urlopen(f"http://127.0.0.1:{listen}{path}", timeout=5) as r:
                    assert r.read() == b"ok"
    # The istio-http/1.1 hint on the mesh cluster; the one with its own TLS offers only its own ALPN ("istio").
    assert seen == ["istio-http/1.1", "istio"]
