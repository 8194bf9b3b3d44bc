"""The xDS proxy drops ALPN ``istio-peer-exchange`` from istiod's TLS contexts, keeping every other protocol in order."""

from __future__ import annotations

from pathlib import Path

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.service.discovery.v3 import discovery_pb2

from vm_agent.telemetry.markers import ALPN_DROPPED, CLUSTER_TYPE_URL, LISTENER_TYPE_URL, PEER_EXCHANGE_ALPN
from vm_agent.telemetry.rewrite import strip_istio_proxy_filters

DATA = Path(__file__).parents[1] / "interop_regressions" / "data"


def _alpn_lists(raw: bytes, type_url: str, *, delta: bool = False) -> dict[str, list[str]]:
    """Every TLS context's ALPN list in a response, by where it sits."""
    if delta:
        anys = [r.resource for r in discovery_pb2.DeltaDiscoveryResponse.FromString(raw).resources]
    else:
        anys = list(discovery_pb2.DiscoveryResponse.FromString(raw).resources)
    out: dict[str, list[str]] = {}

    def add(where: str, ts: base_pb2.TransportSocket) -> None:
        for cls in (tls_pb2.UpstreamTlsContext, tls_pb2.DownstreamTlsContext):
            if ts.typed_config.Is(cls.DESCRIPTOR):
                ctx = cls()
                ts.typed_config.Unpack(ctx)
                out[where] = list(ctx.common_tls_context.alpn_protocols)

    for a in anys:
        if type_url == CLUSTER_TYPE_URL:
            c = cluster_pb2.Cluster()
            a.Unpack(c)
            for m in c.transport_socket_matches:
                add(f"{c.name}/{m.name}", m.transport_socket)
            if c.HasField("transport_socket"):
                add(c.name, c.transport_socket)
        else:
            lis = listener_pb2.Listener()
            a.Unpack(lis)
            for i, fc in enumerate([*lis.filter_chains, lis.default_filter_chain]):
                if fc.HasField("transport_socket"):
                    add(f"{lis.name}/{i}/{fc.name}", fc.transport_socket)
    return out


def _delta(raw: bytes, type_url: str) -> bytes:
    sotw = discovery_pb2.DiscoveryResponse.FromString(raw)
    delta = discovery_pb2.DeltaDiscoveryResponse(type_url=type_url, nonce="n")
    for i, a in enumerate(sotw.resources):
        delta.resources.add(name=str(i), version="v").resource.CopyFrom(a)
    return bytes(delta.SerializeToString())


def test_every_tls_context_loses_only_the_exchange_protocol() -> None:
    for name, type_url in (("cds", CLUSTER_TYPE_URL), ("lds", LISTENER_TYPE_URL)):
        raw = (DATA / f"default-istiod-{name}.pb").read_bytes()
        for delta in (False, True):
            message = _delta(raw, type_url) if delta else raw
            before = _alpn_lists(message, type_url, delta=delta)
            out, dropped = strip_istio_proxy_filters(message, type_url, delta=delta)
            after = _alpn_lists(out, type_url, delta=delta)
            with_exchange = [w for w, alpn in before.items() if PEER_EXCHANGE_ALPN in alpn]
            assert with_exchange, f"{name}: a default istiod offers the exchange somewhere"
            assert dropped[ALPN_DROPPED] == len(with_exchange)
            assert after.keys() == before.keys()
            for where, alpn in before.items():
                assert after[where] == [p for p in alpn if p != PEER_EXCHANGE_ALPN], where


def test_the_captured_lists_become_istiods_disable_mx_alpn_lists() -> None:
    """istiod with PILOT_DISABLE_MX_ALPN sends ALPNInMesh ["istio"] and ALPNDownstream ["h2", "http/1.1"]."""
    cds, _ = strip_istio_proxy_filters((DATA / "default-istiod-cds.pb").read_bytes(), CLUSTER_TYPE_URL, delta=False)
    lds, _ = strip_istio_proxy_filters((DATA / "default-istiod-lds.pb").read_bytes(), LISTENER_TYPE_URL, delta=False)
    clusters = _alpn_lists(cds, CLUSTER_TYPE_URL)
    assert clusters["outbound|57229||vm-app.vm-c091c8.svc.cluster.local/tlsMode-istio"] == ["istio"]
    listeners = _alpn_lists(lds, LISTENER_TYPE_URL)
    assert ["h2", "http/1.1"] in listeners.values()
    assert all(PEER_EXCHANGE_ALPN not in alpn for alpn in [*clusters.values(), *listeners.values()])
