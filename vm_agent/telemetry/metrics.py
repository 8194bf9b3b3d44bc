"""Istio's standard metrics from Envoy's raw ``istiocustom`` series, for the agent's merged ``/stats/prometheus``.

Envoy counts each request or connection under one ``raw`` tag (``vm_agent.telemetry.filters``). Here those raw
series become Istio's metrics: the names and 25 labels istio-proxy's stats filter emits, computed by the same
rules (reporter, peer from the exchange header or the endpoint's metadata, principals from the certificates,
destination service from the cluster's ``istio.services`` metadata, ``unknown``/``latest`` defaults). Raw series
that end up with the same labels (for example two pods of one workload) are added up.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from vm_agent.telemetry.filters import HTTP_METRICS, RAW_VERSION, SEPARATOR, STAT_SCOPE, TCP_METRICS
from vm_agent.telemetry.peer import (
    CANONICAL_NAME,
    CANONICAL_REVISION,
    Workload,
    decode_header,
    from_endpoint,
    spiffe_namespace,
)

UNKNOWN = "unknown"
LABELS = (
    "reporter",
    "source_workload",
    "source_canonical_service",
    "source_canonical_revision",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_service_name",
    "destination_service_namespace",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
)
"""istio-proxy's label order for HTTP metrics; TCP metrics have the same without response_code and grpc status."""
TCP_LABELS = tuple(n for n in LABELS if n not in ("response_code", "grpc_response_status"))
_PASSTHROUGH_CLUSTERS = frozenset(
    {
        "BlackHoleCluster",
        "PassthroughCluster",
        "InboundPassthroughCluster",
        "InboundPassthroughClusterIpv4",
        "InboundPassthroughClusterIpv6",
    }
)
_KINDS = {name: ("counter" if value is None else "histogram") for name, _, value in HTTP_METRICS}
_KINDS.update({name: "counter" for name in TCP_METRICS})
_REQUESTS, _DURATION = HTTP_METRICS[0][0], HTTP_METRICS[1][0]
_PREFIX = f"envoy_{STAT_SCOPE}_"
_OLD_RAW_VERSIONS = ("1", "2")
_V3_FIELDS = (
    # filters._raw's order: the facts known when the request ends, then the request's own.
    "reporter",
    "protocol",
    "response_code",
    "grpc_status",
    "response_flags",
    "cluster",
    "endpoint",
    "local_principal",
    "services",
    "peer_principal",
    "route",
    "host",
    "content_type",
    "peer",
)
_LINE = re.compile(r"^envoy_" + STAT_SCOPE + r'_(istio_\w+)\{raw="((?:[^"\\]|\\.)*)"(?:,le="([^"]*)")?\} (\S+)$')
_UNESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class LocalWorkload:
    """This proxy's side of every metric, read from its node metadata as istio-proxy reads it."""

    workload: str = ""
    namespace: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    app: str = ""
    version: str = ""
    cluster: str = ""
    istio_version: str = ""
    principal: str = ""
    """This proxy's SPIFFE ID: our own SAN on mutual-TLS requests, which the raw tag leaves out."""

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], principal: str = "") -> LocalWorkload:
        labels = metadata.get("LABELS")
        labels = labels if isinstance(labels, Mapping) else {}

        def s(m: Mapping[str, Any], key: str) -> str:
            v = m.get(key)
            return v if isinstance(v, str) else ""

        return cls(
            workload=s(metadata, "WORKLOAD_NAME"),
            namespace=s(metadata, "NAMESPACE"),
            canonical_name=s(labels, CANONICAL_NAME),
            canonical_revision=s(labels, CANONICAL_REVISION),
            app=s(labels, "app"),
            version=s(labels, "version"),
            cluster=s(metadata, "CLUSTER_ID"),
            istio_version=s(metadata, "ISTIO_VERSION"),
            principal=principal,
        )


@dataclass(frozen=True)
class Raw:
    """The facts one raw series was counted under (see ``filters._raw`` for their sources)."""

    reporter: str
    protocol: str
    peer: str = ""
    peer_principal: str = ""
    local_principal: str = ""
    endpoint: str = ""
    cluster: str = ""
    route: str = ""
    services: str = ""
    host: str = ""
    content_type: str = ""
    response_code: str = ""
    grpc_status: str = ""
    response_flags: str = ""

    @classmethod
    def parse(cls, value: str) -> Raw | None:
        parts = value.split(SEPARATOR)
        if parts[0] in _OLD_RAW_VERSIONS:
            return cls(*parts[1:]) if len(parts) == 15 else None
        if parts[0] != RAW_VERSION or not 11 <= len(parts) <= 15:
            return None
        # Version 3: a request that ended before the inbound capture ran has a shorter (empty) request part.
        return cls(**dict(zip(_V3_FIELDS, parts[1:], strict=False)))


@lru_cache(maxsize=1024)
def _peer(header: str) -> Workload | None:
    return decode_header(header) if header else None


def _service(raw: Raw, host_fallback: bool) -> tuple[str, str, str]:
    """(destination service host, its name, its namespace) as istio-proxy derives them."""
    host = name = namespace = ""
    if host_fallback and raw.host:
        host = name = raw.host
    if raw.route == "block_all":
        return host, "BlackHoleCluster", namespace
    if raw.route == "allow_any":
        return host, "PassthroughCluster", namespace
    if not raw.cluster:
        return host, name, namespace
    if raw.cluster in _PASSTHROUGH_CLUSTERS:
        return host, raw.cluster, namespace
    try:
        services = json.loads(raw.services) if raw.services else []
    except json.JSONDecodeError:
        services = []
    if isinstance(services, list) and services and isinstance(services[0], dict):
        first = services[0]
        host = str(first.get("host", host))
        namespace = str(first.get("namespace", ""))
        name = str(first["name"]) if "name" in first else host.split(".", 1)[0]
    return host, name, namespace


def istio_labels(raw: Raw, local: LocalWorkload) -> dict[str, str]:
    """The labels istio-proxy's stats filter puts on this raw series' metrics."""
    inbound = raw.reporter == "destination"
    if not raw.local_principal and raw.peer_principal:
        # The tag leaves our own SAN out (filters._raw): a peer with a URI SAN means the mesh's mutual TLS, in
        # which we show the agent's certificate.
        raw = replace(raw, local_principal=local.principal)
    peer = _peer(raw.peer)
    if peer is None and not inbound and raw.endpoint:
        peer = from_endpoint(raw.endpoint)
    host, name, svc_ns = _service(raw, host_fallback=not inbound)
    peer_san = raw.peer_principal
    if not inbound and not peer_san and peer is not None:
        peer_san = peer.identity
    peer_ns = spiffe_namespace(peer_san) if peer_san else ""
    if not peer_ns and peer is not None:
        peer_ns = peer.namespace
    p = peer or Workload()
    remote = {
        "workload": p.workload or UNKNOWN,
        "canonical_service": p.canonical_name or UNKNOWN,
        "canonical_revision": p.canonical_revision or "latest",
        "workload_namespace": peer_ns or UNKNOWN,
        "principal": peer_san or UNKNOWN,
        "app": p.app or UNKNOWN,
        "version": p.version or UNKNOWN,
        "cluster": p.cluster or UNKNOWN,
    }
    me = {
        "workload": local.workload,
        "canonical_service": local.canonical_name,
        "canonical_revision": local.canonical_revision,
        "workload_namespace": local.namespace,
        "principal": raw.local_principal or UNKNOWN,
        "app": local.app,
        "version": local.version,
        "cluster": local.cluster,
    }
    out = {"reporter": raw.reporter}
    if inbound:
        out.update({f"source_{k}": v for k, v in remote.items()})
        out.update({f"destination_{k}": v for k, v in me.items()})
        out["destination_service"] = host or local.canonical_name
        out["destination_service_name"] = name or local.canonical_name
        out["destination_service_namespace"] = local.namespace
        security = "mutual_tls" if raw.peer_principal and raw.local_principal else "none"
    else:
        out.update({f"source_{k}": v for k, v in me.items()})
        out.update({f"destination_{k}": v for k, v in remote.items()})
        out["destination_service"] = host or UNKNOWN
        out["destination_service_name"] = name or UNKNOWN
        out["destination_service_namespace"] = svc_ns or peer_ns or UNKNOWN
        security = UNKNOWN  # istio-proxy knows the policy only on the server side
    if raw.protocol == "tcp":
        out["request_protocol"] = "tcp"
    else:
        grpc = _is_grpc(raw.content_type)
        out["request_protocol"] = "grpc" if grpc else "http"
        out["response_code"] = raw.response_code or "0"
        out["grpc_response_status"] = raw.grpc_status if grpc else ""
    out["response_flags"] = raw.response_flags or "-"
    out["connection_security_policy"] = security
    order = TCP_LABELS if raw.protocol == "tcp" else LABELS
    return {k: out[k] for k in order}


def _is_grpc(content_type: str) -> bool:
    """Envoy's gRPC test on the request's content type (application/grpc, optionally +format or ;params)."""
    ct = content_type.strip().lower()
    return ct == "application/grpc" or ct.startswith(("application/grpc+", "application/grpc;"))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(text: str) -> float:
    return float(text)


def _fmt(value: float) -> str:
    return str(int(value)) if value.is_integer() else repr(value)


class IstioMetrics:
    """Rewrites Envoy's Prometheus text: raw ``istiocustom`` series out, Istio's metrics in."""

    def __init__(
        self,
        local: LocalWorkload,
        services: Callable[[str], str] | None = None,
        native: Callable[[], str] | None = None,
    ) -> None:
        """``services``: cluster name → its services as JSON (``ClusterServices``), for raw tags that name only
        the cluster; ``native``: the native stats filter's histograms (``NativeStats.read``), raw series in Envoy's
        text format, rendered with Envoy's own."""
        self.local = local
        self._services = services
        self._native = native
        self._labels_of = lru_cache(maxsize=4096)(self._labels_uncached)

    def _labels(self, raw_value: str) -> tuple[tuple[str, str], ...] | None:
        raw = Raw.parse(raw_value)
        if raw is None:
            return None
        if not raw.services and raw.cluster and self._services is not None:
            raw = replace(raw, services=self._services(raw.cluster))
        return self._labels_of(raw)

    def _labels_uncached(self, raw: Raw) -> tuple[tuple[str, str], ...]:
        return tuple(istio_labels(raw, self.local).items())

    def render(self, envoy_text: str) -> str:
        if self._native is not None:
            extra = self._native()
            if extra:
                envoy_text = envoy_text.rstrip("\n") + "\n" + extra
        counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        buckets: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, float]] = {}
        requests: dict[tuple[tuple[str, str], ...], float] = {}
        kept: list[str] = []
        seen = False
        for line in envoy_text.splitlines():
            if not line.startswith((_PREFIX, f"# TYPE {_PREFIX}", f"# HELP {_PREFIX}")):
                kept.append(line)
                continue
            seen = True
            m = _LINE.match(line)
            if m is None:
                continue
            full, raw_escaped, le, value = m.groups()
            metric, part = _split_metric(full)
            if metric is None:
                continue
            labels = self._labels(_UNESCAPE.sub(lambda g: "\n" if g.group(1) == "n" else g.group(1), raw_escaped))
            if labels is None:
                continue
            key = (metric, labels)
            if _KINDS[metric] == "counter":
                counters[key] = counters.get(key, 0.0) + _number(value)
            else:
                slot = buckets.setdefault(key, {})
                name = f"le={le}" if part == "_bucket" else part
                slot[name] = slot.get(name, 0.0) + _number(value)
                if metric == _DURATION and part == "_count":
                    requests[labels] = requests.get(labels, 0.0) + _number(value)
        if not seen:
            return envoy_text
        # Every request lands in the duration histogram once, so its count is istio_requests_total. An Envoy
        # still configured with the counter itself (by an older agent) keeps its own figure.
        if not any(m == _REQUESTS for m, _ in counters):
            for labels, count in requests.items():
                counters[(_REQUESTS, labels)] = count
        out = "\n".join(kept).rstrip("\n")
        block = "\n".join(self._lines(counters, buckets))
        return f"{out}\n{block}\n" if out else f"{block}\n"

    def _lines(
        self,
        counters: Mapping[tuple[str, tuple[tuple[str, str], ...]], float],
        buckets: Mapping[tuple[str, tuple[tuple[str, str], ...]], Mapping[str, float]],
    ) -> Iterator[str]:
        yield "# TYPE istio_build gauge"
        yield f'istio_build{{component="proxy",tag="{_escape(self.local.istio_version or UNKNOWN)}"}} 1'
        for metric, kind in _KINDS.items():
            if kind == "counter":
                series = [(labels, v) for (m, labels), v in counters.items() if m == metric]
                if series:
                    yield f"# TYPE {metric} counter"
                for labels, v in series:
                    yield f"{metric}{{{_render(labels)}}} {_fmt(v)}"
                continue
            hist = [(labels, v) for (m, labels), v in buckets.items() if m == metric]
            if hist:
                yield f"# TYPE {metric} histogram"
            for labels, parts in hist:
                text = _render(labels)
                bounds = sorted((k[3:] for k in parts if k.startswith("le=")), key=_bound)
                for b in bounds:
                    yield f'{metric}_bucket{{{text},le="{b}"}} {_fmt(parts["le=" + b])}'
                yield f"{metric}_sum{{{text}}} {_fmt(parts.get('_sum', 0.0))}"
                yield f"{metric}_count{{{text}}} {_fmt(parts.get('_count', 0.0))}"


def _bound(le: str) -> float:
    return float("inf") if le == "+Inf" else float(le)


def _render(labels: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f'{k}="{_escape(v)}"' for k, v in labels)


def _split_metric(full: str) -> tuple[str | None, str]:
    if full in _KINDS:
        return full, ""
    for suffix in ("_bucket", "_sum", "_count"):
        base = full.removesuffix(suffix)
        if base != full and _KINDS.get(base) == "histogram":
            return base, suffix
    return None, ""
