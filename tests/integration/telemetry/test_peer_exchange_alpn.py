"""Real Envoy, with the TLS contexts a default istiod pushed: the VM never negotiates ``istio-peer-exchange``.

istio-proxy's exchange filter writes a binary preamble (magic 0x3D230467, length, a google.protobuf.Any) into
any connection that negotiated ``istio-peer-exchange``. The VM's stock Envoy has no such filter, so with istiod's
ALPN lists a pod's preamble would land in the VM application's stream. The xDS proxy drops that protocol from
every TLS context it forwards (vm_agent.telemetry.rewrite); these tests run Envoy with istiod's captured cluster and
listener TLS contexts after that step and check the negotiated protocol from both sides:

* outbound: the VM's cluster ``outbound|57229||vm-app...`` dials a stand-in server that behaves like istio-proxy's
  exchange filter; the stand-in never gets the protocol and the VM's client reads its own bytes back unchanged.
* inbound: a client that offers ``[istio-peer-exchange, istio]`` like a pod reaches istiod's inbound TCP chain;
  the VM's Envoy accepts the connection and negotiates no exchange.

The same runs with istiod's unmodified contexts show the test can fail: there the exchange is negotiated.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, json_format, struct_pb2

from tests.helpers.envoy import uds_grpc_cluster
from tests.helpers.net import free_port
from tests.integration.mesh_xdsgen.support import MeshCa, Svid, running_envoy, sds_server
from vm_agent.telemetry.markers import CLUSTER_TYPE_URL, LISTENER_TYPE_URL, PEER_EXCHANGE_ALPN
from vm_agent.telemetry.rewrite import strip_istio_proxy_filters

pytestmark = [pytest.mark.integration]

DATA = Path(__file__).parents[2] / "unit" / "interop_regressions" / "data"
OUTBOUND = "outbound|57229||vm-app.vm-c091c8.svc.cluster.local"
MAGIC = 0x3D230467
PAYLOAD = b"plain bytes from the VM's application\n"


def istiod_push(type_url: str, *, strip: bool) -> list[Any]:
    name = "cds" if type_url == CLUSTER_TYPE_URL else "lds"
    raw = (DATA / f"default-istiod-{name}.pb").read_bytes()
    if strip:
        raw, _ = strip_istio_proxy_filters(raw, type_url, delta=False)
    out: list[Any] = []
    for a in discovery_pb2.DiscoveryResponse.FromString(raw).resources:
        msg = cluster_pb2.Cluster() if type_url == CLUSTER_TYPE_URL else listener_pb2.Listener()
        a.Unpack(msg)
        out.append(msg)
    return out


def as_dict(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def preamble() -> bytes:
    """What istio-proxy's exchange filter writes first: magic, length, Any(Struct) with the peer's metadata."""
    peer = struct_pb2.Struct()
    peer.fields["x-envoy-peer-metadata-id"].string_value = "sidecar~10.1.1.1~pod.ns~ns.svc.cluster.local"
    peer.fields["x-envoy-peer-metadata"].struct_value.fields["NAMESPACE"].string_value = "ns"
    body = any_pb2.Any()
    body.Pack(peer)
    data = body.SerializeToString()
    return struct.pack(">II", MAGIC, len(data)) + data


def _tls_files(tmp: Path, ca: MeshCa, svid: Svid, name: str) -> tuple[Path, Path, Path]:
    cert, key, root = tmp / f"{name}.crt", tmp / f"{name}.key", tmp / "root.crt"
    cert.write_bytes(svid.chain_pem)
    key.write_bytes(svid.key_pem)
    root.write_bytes(ca.root_pem)
    return cert, key, root


@contextlib.contextmanager
def exchange_stand_in(tmp: Path, ca: MeshCa) -> Iterator[tuple[int, list[str | None]]]:
    """A TLS server like a pod's istio-proxy inbound: offers the exchange ALPN and writes the preamble on it."""
    cert, key, root = _tls_files(tmp, ca, ca.issue("spiffe://cluster.local/ns/vm-c091c8/sa/pod-sa"), "pod")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(root)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([PEER_EXCHANGE_ALPN, "istio"])
    negotiated: list[str | None] = []
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with contextlib.suppress(OSError), ctx.wrap_socket(conn, server_side=True) as tls:
                alpn = tls.selected_alpn_protocol()
                negotiated.append(alpn)
                if alpn == PEER_EXCHANGE_ALPN:
                    tls.sendall(preamble())
                data = tls.recv(65536)
                tls.sendall(data)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield port, negotiated
    finally:
        stop.set()
        t.join(5)
        srv.close()


@contextlib.contextmanager
def plain_echo() -> Iterator[int]:
    srv = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.sendall(conn.recv(65536))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


def _tcp_proxy(cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            "stat_prefix": cluster,
            "cluster": cluster,
        },
    }


def _static(name: str, port: int, endpoint_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    ep: dict[str, Any] = {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
    if endpoint_metadata:
        ep["metadata"] = {"filter_metadata": endpoint_metadata}
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [ep]}]},
    }


def envoy_boot(tmp: Path, sds: Path, *, strip: bool, stand_in: int, echo: int) -> tuple[dict[str, Any], int, int]:
    """Envoy with istiod's outbound cluster (endpoint → stand-in) and istiod's inbound TCP chain (→ echo)."""
    (cluster,) = [c for c in istiod_push(CLUSTER_TYPE_URL, strip=strip) if c.name == OUTBOUND]
    out = as_dict(cluster)
    for key in ("eds_cluster_config", "filters"):  # no EDS server; the exchange filter is istio-proxy's
        out.pop(key, None)
    out["type"] = "STATIC"
    out["load_assignment"] = _static(OUTBOUND, stand_in, {"envoy.transport_socket_match": {"tlsMode": "istio"}})[
        "load_assignment"
    ]
    (virtual_inbound,) = [lis for lis in istiod_push(LISTENER_TYPE_URL, strip=strip) if lis.name == "virtualInbound"]
    (chain,) = [
        fc
        for fc in virtual_inbound.filter_chains
        if list(fc.filter_chain_match.application_protocols) == [PEER_EXCHANGE_ALPN, "istio"]
    ]
    del chain.filters[:]  # istiod's exchange and stats filters are istio-proxy's; the TLS context is what counts
    tcp_chain = as_dict(chain)
    tcp_chain["filters"] = [_tcp_proxy("inbound-echo")]
    out_port, in_port, admin = free_port(), free_port(), free_port()
    boot = {
        "node": {"id": "sidecar~127.0.0.2~vm.vm-c091c8~vm-c091c8.svc.cluster.local", "cluster": "vm-app.vm-c091c8"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "clusters": [out, _static("inbound-echo", echo), uds_grpc_cluster("sds-grpc", sds)],
            "listeners": [
                {
                    "name": "outbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": out_port}},
                    "filter_chains": [{"filters": [_tcp_proxy(OUTBOUND)]}],
                },
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": in_port}},
                    "listener_filters": [
                        {
                            "name": "envoy.filters.listener.tls_inspector",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3"
                                ".TlsInspector"
                            },
                        }
                    ],
                    "filter_chains": [tcp_chain],
                },
            ],
        },
    }
    return boot, out_port, in_port


def _roundtrip_plain(port: int) -> bytes:
    """Everything the VM's application reads back until the stand-in closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(PAYLOAD)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


def _roundtrip_as_pod(port: int, tmp: Path, ca: MeshCa) -> tuple[str | None, bytes]:
    cert, key, root = _tls_files(tmp, ca, ca.issue("spiffe://cluster.local/ns/pods/sa/client"), "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(root)
    ctx.check_hostname = False
    ctx.set_alpn_protocols([PEER_EXCHANGE_ALPN, "istio"])  # what a pod's outbound cluster offers
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, ctx.wrap_socket(raw) as tls:
        alpn = tls.selected_alpn_protocol()
        tls.sendall(PAYLOAD)
        got = b""
        while len(got) < len(PAYLOAD):
            chunk = tls.recv(65536)
            if not chunk:
                break
            got += chunk
        return alpn, got


def _run(tmp: Path, *, strip: bool) -> tuple[list[str | None], bytes, str | None, bytes]:
    ca = MeshCa()
    svid = ca.issue("spiffe://cluster.local/ns/vm-c091c8/sa/vm-sa")
    sds = tmp / "sds.sock"
    with (
        sds_server(sds, svid, ca.root_pem),
        exchange_stand_in(tmp, ca) as (stand_in, negotiated),
        plain_echo() as echo,
    ):
        boot, out_port, in_port = envoy_boot(tmp, sds, strip=strip, stand_in=stand_in, echo=echo)
        with running_envoy(boot, tmp):
            outbound = _roundtrip_plain(out_port)
            inbound_alpn, inbound = _roundtrip_as_pod(in_port, tmp, ca)
    return negotiated, outbound, inbound_alpn, inbound


def test_the_vm_never_negotiates_the_peer_exchange(tmp_path: Path) -> None:
    negotiated, outbound, inbound_alpn, inbound = _run(tmp_path, strip=True)
    # Outbound: the VM offered only "istio"; the exchange stand-in wrote no preamble into the VM's stream.
    assert negotiated == ["istio"]
    assert outbound == PAYLOAD
    # Inbound: a pod offering the exchange gets no ALPN at all (istiod's inbound TCP chain keeps h2, http/1.1).
    assert inbound_alpn is None
    assert inbound == PAYLOAD


def test_istiods_contexts_unchanged_would_negotiate_it(tmp_path: Path) -> None:
    negotiated, outbound, inbound_alpn, inbound = _run(tmp_path, strip=False)
    assert negotiated == [PEER_EXCHANGE_ALPN]
    assert outbound == preamble() + PAYLOAD  # the preamble lands in the application's bytes
    assert inbound_alpn == PEER_EXCHANGE_ALPN
    assert inbound == PAYLOAD
