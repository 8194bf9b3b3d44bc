"""Stock Envoy filters that stand in for istio-proxy's exchange, ALPN and stats filters (Envoy JSON form).

Division of work (docs/interop.md, "Peer metadata and Istio's metrics on stock Envoy"):

* Exchange: upstream ``header_mutation`` filters on the mesh clusters (chosen once per CDS update) add this
  workload's ``x-envoy-peer-metadata(-id)`` to every request to them; on inbound mutual-TLS chains a
  ``header_mutation`` answers with ours; ``header_to_metadata`` moves a peer's headers into dynamic metadata and
  removes them, so the application never sees them. No expression is evaluated per request.
* ALPN hint: ``set_filter_state`` sets a constant ``envoy.network.application_protocols`` on the upstream
  connection, turned off per route where istiod says the cluster wants its own ALPN (``telemetry.alpn``).
* Metrics: the stats access logger counts every request (HTTP) or connection (TCP) into one raw series per
  distinct combination of the facts Istio's labels are computed from (peer header, certificates, endpoint and
  cluster metadata, response). The agent turns those raw series into Istio's metric names and labels when it
  serves ``/stats/prometheus`` (``vm_agent.telemetry.metrics``): that keeps per-request work to formatting one
  tag value per stat, and keeps Istio's label rules in one tested place.
"""

from __future__ import annotations

from typing import Any

from vm_agent.telemetry.peer import HEADER, HEADER_ID

STAT_SCOPE = "istiocustom"
"""Istio's own stat namespace; Envoy's Prometheus output shows it as ``envoy_istiocustom_*``."""
RAW_TAG = "raw"
RAW_VERSION = "2"
"""2: the services slot is empty, the agent fills it from CDS; 1 printed them (still read)."""
SEPARATOR = "\x1f"
"""Joins the raw facts in one tag value; a control character no header, SAN, name or JSON text carries."""
PEER_DOWNSTREAM = "io.istio.peer.downstream"
PEER_UPSTREAM = "io.istio.peer.upstream"

TYPE = {
    "header_mutation": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
    "header_to_metadata": "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config",
    "set_filter_state": "type.googleapis.com/envoy.extensions.filters.http.set_filter_state.v3.Config",
    "upstream_codec": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec",
    "http_protocol_options": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "typed_struct": "type.googleapis.com/xds.type.v3.TypedStruct",
    "stats_logger": "type.googleapis.com/envoy.extensions.access_loggers.stats.v3.Config",
}

HTTP_METRICS = (
    # (Istio's name, kind, value) in istio-proxy's order; histograms use Envoy's (and Istio's) default buckets.
    ("istio_requests_total", "counter", None),  # rendered from istio_request_duration_milliseconds_count
    ("istio_request_duration_milliseconds", "Milliseconds", "%DURATION%"),
    ("istio_request_bytes", "Bytes", "%DOWNSTREAM_WIRE_BYTES_RECEIVED%"),
    ("istio_response_bytes", "Bytes", "%DOWNSTREAM_WIRE_BYTES_SENT%"),
)
TCP_METRICS = (
    "istio_tcp_connections_opened_total",
    "istio_tcp_connections_closed_total",
    "istio_tcp_sent_bytes_total",
    "istio_tcp_received_bytes_total",
)


def _header(name: str, value: str) -> dict[str, Any]:
    # Base64 and node ids hold no '%': the value is taken as it is, no formatter runs per request.
    return {"append": {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}


def _capture(namespace: str, *, with_id: bool = True) -> list[dict[str, Any]]:
    """The peer's headers into metadata, removed. The id is captured only to remove it (the labels do not use
    it); ``with_id=False`` when the route configuration removes it instead."""
    headers = ((HEADER, "metadata"), (HEADER_ID, "id")) if with_id else ((HEADER, "metadata"),)
    return [
        {
            "header": header,
            "on_header_present": {"metadata_namespace": namespace, "key": key, "type": "STRING"},
            "remove": True,
        }
        for header, key in headers
    ]


def outbound_exchange() -> list[dict[str, Any]]:
    """On the HCM: the peer's metadata answer is read into metadata and removed (our headers go out, and the
    peer's id header is removed, in the mesh clusters' upstream filters, :func:`upstream_exchange`)."""
    return [
        {
            "name": "istio.metadata_exchange.discovery",
            "typed_config": {
                "@type": TYPE["header_to_metadata"],
                "response_rules": _capture(PEER_UPSTREAM, with_id=False),
            },
        }
    ]


def upstream_exchange(node_id: str, value: str) -> list[dict[str, Any]]:
    """Upstream HTTP filters of a mesh cluster: every request to it carries our metadata, and the peer's id header
    leaves its answer here (a removal costs less than the metadata rule that would otherwise take it off; only
    mesh clusters get an answer). Attached only to the clusters istio-proxy sends the headers to (decided once per
    CDS update, not per request)."""
    return [
        {
            "name": "istio.metadata_exchange.propagation",
            "typed_config": {
                "@type": TYPE["header_mutation"],
                "mutations": {
                    "request_mutations": [_header(HEADER_ID, node_id), _header(HEADER, value)],
                    "response_mutations": [{"remove": HEADER_ID}],
                },
            },
        },
        {"name": "envoy.filters.http.upstream_codec", "typed_config": {"@type": TYPE["upstream_codec"]}},
    ]


def answer_headers(node_id: str, value: str) -> list[dict[str, Any]]:
    """Our exchange headers as route-level ``response_headers_to_add`` (the router adds them; no filter runs)."""
    return [
        {"header": {"key": name, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for name, v in ((HEADER_ID, node_id), (HEADER, value))
    ]


def inbound_exchange(node_id: str, value: str, *, mtls: bool, capture_id: bool = True) -> list[dict[str, Any]]:
    """A peer's headers are read into metadata and removed; on mutual-TLS chains (mesh callers) our answer goes
    back on every response. istio-proxy answers only requests that carried the headers: deciding that per request
    cost a CEL evaluation, and a mesh caller without the exchange just ignores two headers."""
    out: list[dict[str, Any]] = [
        {
            "name": "istio.metadata_exchange.discovery",
            "typed_config": {
                "@type": TYPE["header_to_metadata"],
                "request_rules": _capture(PEER_DOWNSTREAM, with_id=capture_id),
            },
        }
    ]
    if mtls:
        out.append(
            {
                "name": "istio.metadata_exchange.propagation",
                "typed_config": {
                    "@type": TYPE["header_mutation"],
                    "mutations": {"response_mutations": [_header(HEADER_ID, node_id), _header(HEADER, value)]},
                },
            }
        )
    return out


ALPN_HINT = "istio-http/1.1,istio"


def alpn_hint() -> dict[str, Any]:
    """istio.alpn's hint on the upstream TLS handshake, so a pod's inbound listener picks its HTTP chain on ports
    with protocol sniffing.

    istio-proxy chooses ``istio-http/1.0``, ``istio-http/1.1`` or ``istio-h2`` by the request's protocol; the
    peer's HTTP chain accepts all three alike and its codec detects HTTP/1 or HTTP/2 from the first bytes, so one
    constant does the same job without a per-request expression. Routes to clusters with the user's own TLS
    (``istio.alpn_override: "false"``) get the filter turned off (``vm_agent.telemetry.alpn``). istio-proxy also
    appends the codec's own ALPN; that is left out so a cluster with a fixed, different codec still works.
    """
    return {
        "name": "istio.alpn",
        "typed_config": {
            "@type": TYPE["set_filter_state"],
            "on_request_headers": [
                {
                    "object_key": "envoy.network.application_protocols",
                    "format_string": {"text_format_source": {"inline_string": ALPN_HINT}},
                    "shared_with_upstream": "ONCE",
                }
            ],
        },
    }


def _raw(reporter: str, protocol: str) -> str:
    """The one tag every metric carries: the facts Istio's labels are computed from, in a fixed order."""
    inbound = reporter == "destination"
    side = "DOWNSTREAM" if inbound else "UPSTREAM"
    http = protocol == "http"
    peer = f"%DYNAMIC_METADATA({PEER_DOWNSTREAM if inbound else PEER_UPSTREAM}:metadata)%" if http else ""
    facts = [
        RAW_VERSION,
        reporter,
        protocol,
        peer,
        f"%{side}_PEER_URI_SAN%",
        # Inbound, our own certificate's SAN is the agent's SPIFFE ID whenever the caller showed one (mesh
        # chains demand client certificates): the agent fills it in, one command less per stat.
        "" if inbound else f"%{side}_LOCAL_URI_SAN%",
        "" if inbound else "%UPSTREAM_METADATA(istio:workload)%",
        "%UPSTREAM_CLUSTER_RAW%",
        "%ROUTE_NAME%" if http else "",
        # The cluster's services: looked up by cluster name at scrape time (telemetry/clusters.py), not printed
        # as JSON by every stat of every request. The slot stays so raw version 1 tags still parse.
        "",
        # istiod turns the Host fallback off on inbound listeners (disable_host_header_fallback).
        "%REQ(:AUTHORITY)%" if http and not inbound else "",
        # The content type decides gRPC (agent side): a plain formatter costs less per stat than a CEL test.
        "%REQ(CONTENT-TYPE)%" if http else "",
        "%RESPONSE_CODE%" if http else "",
        "%GRPC_STATUS_NUMBER%" if http else "",
        "%RESPONSE_FLAGS%",
    ]
    return SEPARATOR.join(facts)


def _stat(name: str, raw: str) -> dict[str, Any]:
    return {"name": name, "tags": [{"name": RAW_TAG, "value_format": raw}]}


def _stats_logger(name: str, config: dict[str, Any], log_types: list[str] | None = None) -> dict[str, Any]:
    # TypedStruct: Envoy 1.40's stats logger has fields (stats_scope) older Python descriptors do not know.
    log: dict[str, Any] = {
        "name": name,
        "typed_config": {
            "@type": TYPE["typed_struct"],
            "type_url": TYPE["stats_logger"],
            "value": {"stats_scope": {"prefix": STAT_SCOPE}, **config},
        },
    }
    if log_types:
        log["filter"] = {"log_type_filter": {"types": log_types}}
    return log


def http_stats(reporter: str) -> dict[str, Any]:
    """HCM access log: the three request histograms (istio_requests_total is derived from the first)."""
    raw = _raw(reporter, "http")
    # Envoy formats every stat's tag anew per request: istio_requests_total is not a stat of its own but the
    # duration histogram's count, which the agent renders as the counter (one tag format per request saved).
    histograms = [
        {"stat": _stat(name, raw), "unit": kind, "value_format": value}
        for name, kind, value in HTTP_METRICS
        if value is not None
    ]
    return _stats_logger("istio.stats", {"histograms": histograms})


def tcp_stats(reporter: str) -> list[dict[str, Any]]:
    """tcp_proxy access logs: a connection counts as opened once its upstream is connected (or when it ends
    without one), and as closed, with its bytes, when it ends."""
    raw = _raw(reporter, "tcp")
    opened = _stats_logger(
        "istio.stats.opened",
        {"counters": [{"stat": _stat(TCP_METRICS[0], raw), "value_fixed": 1}]},
    )
    opened["filter"] = {
        "or_filter": {
            "filters": [
                {"log_type_filter": {"types": ["TcpUpstreamConnected"]}},
                {
                    "and_filter": {
                        "filters": [
                            {"log_type_filter": {"types": ["TcpConnectionEnd"]}},
                            {"response_flag_filter": {}},
                        ]
                    }
                },
            ]
        }
    }
    closed = _stats_logger(
        "istio.stats.closed",
        {
            "counters": [
                {"stat": _stat(TCP_METRICS[1], raw), "value_fixed": 1},
                {"stat": _stat(TCP_METRICS[2], raw), "value_format": "%DOWNSTREAM_WIRE_BYTES_SENT%"},
                {"stat": _stat(TCP_METRICS[3], raw), "value_format": "%DOWNSTREAM_WIRE_BYTES_RECEIVED%"},
            ]
        },
        ["TcpConnectionEnd"],
    )
    return [opened, closed]
