"""Stock Envoy filters that stand in for istio-proxy's exchange, ALPN and stats filters (Envoy JSON form).

Division of work (docs/interop.md, "Peer metadata and Istio's metrics on stock Envoy"):

* Exchange: upstream ``header_mutation`` filters on the mesh clusters (chosen once per CDS update) add this
  workload's ``x-envoy-peer-metadata(-id)`` to every request to them; inbound, the caller's metadata header is
  read with the request's other facts (``request_capture``), both headers are removed and mutual-TLS chains
  answer with ours (in the router where the route configuration is inline); outbound, ``header_to_metadata``
  moves the answer into dynamic metadata and removes it. The application never sees them. No expression is
  evaluated per request.
* ALPN hint: ``set_filter_state`` sets a constant ``envoy.network.application_protocols`` on the upstream
  connection, turned off per route where istiod says the cluster wants its own ALPN (``telemetry.alpn``).
* Metrics: the stats access logger counts every request (HTTP) or connection (TCP) into one raw series per
  distinct combination of the facts Istio's labels are computed from (peer header, certificates, endpoint and
  cluster metadata, response). The agent turns those raw series into Istio's metric names and labels when it
  serves ``/stats/prometheus`` (``vm_agent.telemetry.metrics``): that keeps per-request work to formatting one
  tag value per stat (inbound, mostly one string formatted once per request), and keeps Istio's label rules in
  one tested place.
"""

from __future__ import annotations

from typing import Any

from vm_agent.telemetry.peer import HEADER, HEADER_ID

STAT_SCOPE = "istiocustom"
"""Istio's own stat namespace; Envoy's Prometheus output shows it as ``envoy_istiocustom_*``."""
RAW_TAG = "raw"
RAW_VERSION = "3"
"""3: the facts known when the request ends first, the request's own last (``_raw``); 2: the services slot is
empty, the agent fills it from CDS; 1 printed them (both still read)."""
REQUEST_FACTS = "istio.stats.request"
"""Filter state key of the inbound request's facts (:func:`request_capture`)."""
SEPARATOR = "\x1f"
"""Joins the raw facts in one tag value; a control character no header, SAN, name or JSON text carries."""
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


PEER_HEADERS = (HEADER_ID, HEADER)


def outbound_exchange() -> list[dict[str, Any]]:
    """On the HCM: the peer's metadata answer is read into metadata and removed (our headers go out, and the
    peer's id header is removed, in the mesh clusters' upstream filters, :func:`upstream_exchange`)."""
    return [
        {
            "name": "istio.metadata_exchange.discovery",
            "typed_config": {
                "@type": TYPE["header_to_metadata"],
                # The id header is not read (the labels use the metadata); the upstream filter removes it.
                "response_rules": [
                    {
                        "header": HEADER,
                        "on_header_present": {"metadata_namespace": PEER_UPSTREAM, "key": "metadata", "type": "STRING"},
                        "remove": True,
                    }
                ],
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


def inbound_exchange(node_id: str, value: str, *, mtls: bool) -> list[dict[str, Any]]:
    """For an HCM whose route configuration is not inline: the caller's headers are removed (after
    :func:`request_capture` has read the metadata one) and, on mutual-TLS chains (mesh callers), our answer goes
    back on every response. Inline route configurations do both in the router (``answer_headers``,
    ``PEER_HEADERS``) for less. istio-proxy answers only requests that carried the headers: deciding that per
    request cost a CEL evaluation, and a mesh caller without the exchange just ignores two headers."""
    mutations: dict[str, Any] = {"request_mutations": [{"remove": h} for h in PEER_HEADERS]}
    if mtls:
        mutations["response_mutations"] = [_header(HEADER_ID, node_id), _header(HEADER, value)]
    return [
        {
            "name": "istio.metadata_exchange.propagation",
            "typed_config": {"@type": TYPE["header_mutation"], "mutations": mutations},
        }
    ]


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


def _request_facts(inbound: bool, http: bool, exchange: bool) -> list[str]:
    """The facts known once the request's headers are in: the raw tag's last five fields."""
    side = "DOWNSTREAM" if inbound else "UPSTREAM"
    if not http:
        return [f"%{side}_PEER_URI_SAN%", "", "", "", ""]
    if inbound:
        # The route and the Host fallback are not used on this side (istiod turns the fallback off on inbound
        # listeners, disable_host_header_fallback); the caller's header is read only where the exchange is on.
        peer = f"%REQ({HEADER})%" if exchange else ""
        return ["%DOWNSTREAM_PEER_URI_SAN%", "", "", "%REQ(CONTENT-TYPE)%", peer]
    return [
        "%UPSTREAM_PEER_URI_SAN%",
        "%ROUTE_NAME%",
        "%REQ(:AUTHORITY)%",
        # The content type decides gRPC (agent side): a plain formatter costs less per stat than a CEL test.
        "%REQ(CONTENT-TYPE)%",
        f"%DYNAMIC_METADATA({PEER_UPSTREAM}:metadata)%",
    ]


def request_capture(*, exchange: bool) -> dict[str, Any]:
    """Inbound HTTP: the request's facts formatted once, into filter state, for the three histograms to read.

    Envoy formats every stat's tag anew, so a fact in the tag is formatted three times per request; formatted here
    it is formatted once and each stat copies one string. The caller's metadata header is read before the router
    removes it (``inbound_exchange``), which also spares the metadata rule that used to move it aside.
    """
    return {
        "name": "istio.stats.request",
        "typed_config": {
            "@type": TYPE["set_filter_state"],
            "on_request_headers": [
                {
                    "object_key": REQUEST_FACTS,
                    "factory_key": "envoy.hashable_string",
                    "format_string": {
                        "text_format_source": {"inline_string": SEPARATOR.join(_request_facts(True, True, exchange))},
                        # A missing fact is an empty field, as in the stat tags (Envoy prints "-" otherwise).
                        "omit_empty_values": True,
                    },
                }
            ],
        },
    }


def _raw(reporter: str, protocol: str, *, captured: bool = False, cluster: str | None = None) -> str:
    """The one tag every metric carries: the facts Istio's labels are computed from, in a fixed order.

    Version 3 puts what is known only when the request ends first and the request's facts last, so that the
    inbound side can print those from filter state (``captured``, :func:`request_capture`) in one piece, and a
    request that ended before that filter ran still parses (its tail is just shorter). ``cluster``: the cluster
    by name when the chain can reach no other (a literal, not formatted per stat).
    """
    inbound = reporter == "destination"
    http = protocol == "http"
    facts = [
        RAW_VERSION,
        reporter,
        protocol,
        "%RESPONSE_CODE%" if http else "",
        "%GRPC_STATUS_NUMBER%" if http else "",
        "%RESPONSE_FLAGS%",
        cluster if cluster is not None else "%UPSTREAM_CLUSTER_RAW%",
        "" if inbound else "%UPSTREAM_METADATA(istio:workload)%",
        # Our own certificate's SAN: the agent's SPIFFE ID whenever the peer showed a URI SAN (inbound, mesh
        # chains demand client certificates; outbound, only the mesh's certificates carry URI SANs). The agent
        # fills it in: one command less per stat. The slot stays for older tags.
        "",
        # The cluster's services: looked up by cluster name at scrape time (telemetry/clusters.py), not printed
        # as JSON by every stat of every request.
        "",
    ]
    tail = [f"%FILTER_STATE({REQUEST_FACTS}:PLAIN)%"] if captured else _request_facts(inbound, http, exchange=True)
    return SEPARATOR.join(facts + tail)


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


def http_stats(reporter: str, *, captured: bool = False, cluster: str | None = None) -> dict[str, Any]:
    """HCM access log: the three request histograms (istio_requests_total is derived from the first).
    ``captured``: the HCM runs :func:`request_capture`; ``cluster``: the only cluster its routes reach."""
    raw = _raw(reporter, "http", captured=captured, cluster=cluster)
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
