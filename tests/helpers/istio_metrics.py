"""What istio-proxy would report for a pair of workloads, and a reader for Prometheus text.

Independent of vm_agent.telemetry on purpose: the expected labels are written out from Istio's documented rules
(istio-proxy's stats filter), so a test comparing them with what an agent serves checks the agent. The lead's
real-istiod lab test reuses it with the lab's workloads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REFERENCE: dict[str, Any] = json.loads((Path(__file__).parents[1] / "data" / "istio_standard_metrics.json").read_text())
"""Istio's published metric and label names (tests/data/istio_standard_metrics.json)."""

_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Peer:
    """One workload as its node metadata and certificate describe it (the facts Istio's labels come from)."""

    workload: str
    namespace: str
    principal: str
    labels: Mapping[str, str]
    cluster: str = "Kubernetes"

    @property
    def canonical_name(self) -> str:
        return self.labels.get("service.istio.io/canonical-name", "")

    @property
    def canonical_revision(self) -> str:
        return self.labels.get("service.istio.io/canonical-revision", "")

    @property
    def app(self) -> str:
        return self.labels.get("app.kubernetes.io/name") or self.labels.get("app", "")

    @property
    def version(self) -> str:
        return self.labels.get("app.kubernetes.io/version") or self.labels.get("version", "")

    @classmethod
    def from_cluster_env(cls, path: Path, trust_domain: str = "cluster.local") -> Peer:
        """From istioctl's cluster.env (the workload's node metadata and service account)."""
        env: dict[str, str] = {}
        for line in path.read_text().splitlines():
            if "=" in line and not line.lstrip().startswith("#"):
                k, v = line.split("=", 1)
                env[k.strip()] = v.strip().strip("'\"")
        ns = env.get("POD_NAMESPACE") or env.get("ISTIO_NAMESPACE", "")
        sa = env.get("SERVICE_ACCOUNT", "default")
        td = env.get("TRUST_DOMAIN") or trust_domain
        return cls(
            workload=env.get("ISTIO_META_WORKLOAD_NAME", ""),
            namespace=ns,
            principal=f"spiffe://{td}/ns/{ns}/sa/{sa}",
            labels=json.loads(env.get("ISTIO_METAJSON_LABELS") or "{}"),
            cluster=env.get("ISTIO_META_CLUSTER_ID", "Kubernetes"),
        )


@dataclass(frozen=True)
class Destination:
    """The destination service (its cluster's istio.services entry)."""

    host: str
    name: str
    namespace: str


def _or(value: str, default: str) -> str:
    return value or default


def expected_labels(
    reporter: str,
    source: Peer,
    destination: Peer,
    service: Destination,
    *,
    protocol: str = "http",
    response_code: str = "200",
    response_flags: str = "-",
) -> dict[str, str]:
    """The labels istio-proxy puts on a request's metrics between two sidecars that exchanged metadata.

    The reporting side's own values come straight from its node metadata (empty stays empty); the peer's come
    from the exchange and default to ``unknown`` (``latest`` for the canonical revision). Only the server
    knows the connection's security policy.
    """

    def mine(p: Peer) -> dict[str, str]:
        return {
            "workload": p.workload,
            "canonical_service": p.canonical_name,
            "canonical_revision": p.canonical_revision,
            "workload_namespace": p.namespace,
            "principal": p.principal,
            "app": p.labels.get("app", ""),
            "version": p.labels.get("version", ""),
            "cluster": p.cluster,
        }

    def theirs(p: Peer) -> dict[str, str]:
        return {
            "workload": _or(p.workload, "unknown"),
            "canonical_service": _or(p.canonical_name, "unknown"),
            "canonical_revision": _or(p.canonical_revision, "latest"),
            "workload_namespace": _or(p.namespace, "unknown"),
            "principal": _or(p.principal, "unknown"),
            "app": _or(p.app, "unknown"),
            "version": _or(p.version, "unknown"),
            "cluster": _or(p.cluster, "unknown"),
        }

    src = mine(source) if reporter == "source" else theirs(source)
    dst = mine(destination) if reporter == "destination" else theirs(destination)
    out = {"reporter": reporter}
    out.update({f"source_{k}": v for k, v in src.items()})
    out.update({f"destination_{k}": v for k, v in dst.items()})
    out["destination_service"] = service.host
    out["destination_service_name"] = service.name
    out["destination_service_namespace"] = service.namespace
    out["request_protocol"] = protocol
    if protocol != "tcp":
        out["response_code"] = response_code
        out["grpc_response_status"] = ""
    out["response_flags"] = response_flags
    out["connection_security_policy"] = "mutual_tls" if reporter == "destination" else "unknown"
    return out


def series(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text page as (name, labels, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SERIES.match(line)
        if m is None:
            continue
        name, labels, value = m.groups()
        parsed = {
            k: re.sub(r"\\(.)", lambda g: "\n" if g.group(1) == "n" else g.group(1), v)
            for k, v in _LABEL.findall(labels or "")
        }
        out.append((name, parsed, float(value)))
    return out


def find(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Samples of ``name`` whose labels include ``labels``."""
    return [(lbl, v) for n, lbl, v in series(text) if n == name and all(lbl.get(k) == v2 for k, v2 in labels.items())]
