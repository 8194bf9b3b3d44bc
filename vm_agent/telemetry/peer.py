"""Istio's peer metadata: the workload a proxy stands for, as the ``x-envoy-peer-metadata`` header carries it.

istio-proxy does not send its whole node metadata. It first reduces it to the few facts telemetry needs (a
"workload metadata object": instance, namespace, workload and its kind, cluster, identity, canonical service and
revision, app, version, locality) and sends that again as a ``google.protobuf.Struct``: the deterministic
protobuf serialization (map keys sorted), base64 with padding. The receiver reads the same keys back; ``app`` and
``version`` prefer the ``app.kubernetes.io/*`` labels. This module does both directions, so the VM sends exactly
what istio-proxy would send for the same node metadata, and the agent reads what pods send.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError

CANONICAL_NAME = "service.istio.io/canonical-name"
CANONICAL_REVISION = "service.istio.io/canonical-revision"
_APP_QUALIFIED = "app.kubernetes.io/name"
_VERSION_QUALIFIED = "app.kubernetes.io/version"
_OWNER_PREFIX = "kubernetes://apis/apps/v1/namespaces/"
_WORKLOAD_KINDS = ("pod", "deployment", "job", "cronjob")

HEADER = "x-envoy-peer-metadata"
HEADER_ID = "x-envoy-peer-metadata-id"


@dataclass(frozen=True)
class Workload:
    """What Istio's telemetry knows about one side of a request. Empty strings mean "not known"."""

    instance: str = ""
    namespace: str = ""
    workload: str = ""
    kind: str = ""
    """pod, deployment, job or cronjob when the owner says so; else empty (istio-proxy then sends no OWNER)."""
    cluster: str = ""
    identity: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    app: str = ""
    version: str = ""
    region: str = ""
    zone: str = ""

    @property
    def owner(self) -> str:
        return f"{_OWNER_PREFIX}{self.namespace}/{self.kind}s/{self.workload}" if self.kind else ""


def _string(value: Any) -> str:
    if isinstance(value, struct_pb2.Value):
        return value.string_value if value.WhichOneof("kind") == "string_value" else ""
    return value if isinstance(value, str) else ""


def _kind(owner: str, workload: str) -> str:
    # The owner ends in "<kind>s/<workload>"; anything else leaves the kind unknown.
    if len(owner) <= len(workload) + 2:
        return ""
    head = owner[: len(owner) - len(workload) - 2]
    kind = head.rsplit("/", 1)[-1] if "/" in head else ""
    return kind if kind in _WORKLOAD_KINDS else ""


def workload_from_metadata(
    metadata: Mapping[str, Any] | struct_pb2.Struct, locality: Mapping[str, str] | None = None
) -> Workload:
    """Node metadata (or a received Struct, as a mapping) reduced to the workload facts Istio keeps.

    ``locality`` is the node's own locality; REGION/AVAILABILITY_ZONE keys in ``metadata`` win over it, as
    they do for a received header.
    """
    if isinstance(metadata, struct_pb2.Struct):
        metadata = dict(metadata.fields)
    labels_raw = metadata.get("LABELS")
    labels: Mapping[str, Any]
    if isinstance(labels_raw, struct_pb2.Value):
        labels = labels_raw.struct_value.fields if labels_raw.WhichOneof("kind") == "struct_value" else {}
    elif isinstance(labels_raw, Mapping):
        labels = labels_raw
    else:
        labels = {}
    app = _string(labels.get(_APP_QUALIFIED)) or _string(labels.get("app"))
    version = _string(labels.get(_VERSION_QUALIFIED)) or _string(labels.get("version"))
    workload = _string(metadata.get("WORKLOAD_NAME"))
    loc = locality or {}
    return Workload(
        instance=_string(metadata.get("NAME")),
        namespace=_string(metadata.get("NAMESPACE")),
        workload=workload,
        kind=_kind(_string(metadata.get("OWNER")), workload),
        cluster=_string(metadata.get("CLUSTER_ID")),
        identity=_string(metadata.get("IDENTITY")),
        canonical_name=_string(labels.get(CANONICAL_NAME)),
        canonical_revision=_string(labels.get(CANONICAL_REVISION)),
        app=app,
        version=version,
        region=_string(metadata.get("REGION")) or loc.get("region", ""),
        zone=_string(metadata.get("AVAILABILITY_ZONE")) or loc.get("zone", ""),
    )


def to_struct(w: Workload) -> struct_pb2.Struct:
    """The Struct istio-proxy sends for a workload: only known facts, LABELS always present."""
    s = struct_pb2.Struct()
    for key, value in (
        ("NAME", w.instance),
        ("NAMESPACE", w.namespace),
        ("WORKLOAD_NAME", w.workload),
        ("CLUSTER_ID", w.cluster),
        ("IDENTITY", w.identity),
        ("OWNER", w.owner),
        ("REGION", w.region),
        ("AVAILABILITY_ZONE", w.zone),
    ):
        if value:
            s.fields[key].string_value = value
    labels = s.fields["LABELS"].struct_value
    labels.SetInParent()  # present even when empty, as istio-proxy sends it
    for key, value in (
        (CANONICAL_NAME, w.canonical_name),
        (CANONICAL_REVISION, w.canonical_revision),
        ("app", w.app),
        ("version", w.version),
    ):
        if value:
            labels.fields[key].string_value = value
    return s


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: int, payload: bytes) -> bytes:
    return bytes([tag]) + _varint(len(payload)) + payload


def serialize_deterministic(s: struct_pb2.Struct) -> bytes:
    """A Struct as C++ protobuf's deterministic serialization writes it: map entries ordered by key bytes.

    Python's runtime also has a deterministic mode but orders keys differently ("NAMESPACE" before "NAME");
    writing the entries here keeps the VM's bytes equal to what istio-proxy sends for the same node.
    """
    out = bytearray()
    for key in sorted(s.fields, key=lambda k: k.encode()):
        value = s.fields[key]
        if value.WhichOneof("kind") == "struct_value":
            encoded = _delimited(0x2A, serialize_deterministic(value.struct_value))  # Value.struct_value = 5
        else:
            encoded = value.SerializeToString()
        out += _delimited(0x0A, _delimited(0x0A, key.encode()) + _delimited(0x12, encoded))  # fields = 1
    return bytes(out)


def header_value(w: Workload) -> str:
    """``x-envoy-peer-metadata`` for a workload: base64 of the deterministic serialization of its Struct."""
    return base64.b64encode(serialize_deterministic(to_struct(w))).decode("ascii")


def decode_header(value: str) -> Workload | None:
    """The workload a received ``x-envoy-peer-metadata`` describes; None when it is not a valid one."""
    raw = value.strip()
    try:
        data = base64.b64decode(raw + "=" * (-len(raw) % 4), validate=True)
        s = struct_pb2.Struct.FromString(data)
    except (binascii.Error, ValueError, DecodeError):
        return None
    return workload_from_metadata(s)


def from_endpoint(encoded: str) -> Workload | None:
    """istiod's endpoint metadata ``istio.workload``: ``workload;namespace;canonical service;revision;cluster``."""
    parts = encoded.split(";")
    if len(parts) < 5:
        return None
    return Workload(
        workload=parts[0],
        namespace=parts[1],
        canonical_name=parts[2],
        canonical_revision=parts[3],
        cluster=parts[4],
    )


def spiffe_namespace(principal: str) -> str:
    """The namespace of ``<trust domain>/ns/<namespace>/sa/<account>``; empty when there is none."""
    start = principal.find("/ns/")
    if start < 0:
        return ""
    start += 4
    end = principal.find("/", start)
    return principal[start:] if end < 0 else principal[start:end]


@dataclass(frozen=True)
class NodeExchange:
    """What this proxy tells its peers: its node id and its ``x-envoy-peer-metadata`` value."""

    node_id: str
    header_value: str
