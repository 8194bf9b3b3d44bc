"""The local mesh's object model: the Kubernetes and Istio objects a VM cares about, parsed from YAML.

Parsing validates the way the API server and Istio's webhook would, so that a manifest the local
mesh accepts is one a real cluster would accept too (and vice versa for the common mistakes).
Every problem is collected (not just the first) and names the file, the object and the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

__all__ = [
    "KINDS",
    "Condition",
    "ManifestError",
    "ManifestErrors",
    "MeshObject",
    "MeshSnapshot",
    "Namespace",
    "ObjectMeta",
    "Service",
    "ServiceAccount",
    "ServiceEntry",
    "ServiceEntryPort",
    "ServicePort",
    "WorkloadEntry",
    "WorkloadEntrySpec",
    "WorkloadGroup",
    "exported_to",
    "key",
    "kind_of",
    "parse_documents",
    "to_manifest",
]

ISTIO_NETWORKING = "networking.istio.io"
ISTIO_VERSIONS = ("v1", "v1beta1", "v1alpha3")
HEALTH_CHECKS_ANNOTATION = "proxy.istio.io/health-checks-enabled"


class ManifestError(ValueError):
    """One problem in one object of one manifest file."""

    def __init__(self, file: str, obj: str, field: str, problem: str) -> None:
        self.file = file
        self.obj = obj
        self.field = field
        self.problem = problem
        super().__init__(f"{file}: {obj}: {field}: {problem}")


class ManifestErrors(ValueError):
    """Every problem found in a manifest; ``str()`` lists them one per line."""

    def __init__(self, errors: list[ManifestError]) -> None:
        self.errors = list(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


@dataclass(frozen=True)
class ObjectMeta:
    name: str
    namespace: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    # The API server assigns uids; the store assigns one when a manifest has none ("" here).
    uid: str = ""
    owner_references: tuple[Mapping[str, Any], ...] = ()


@dataclass(frozen=True)
class Namespace:
    meta: ObjectMeta


@dataclass(frozen=True)
class ServiceAccount:
    meta: ObjectMeta


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int | str
    protocol: str
    # Istio takes the application protocol from appProtocol, else from the port name prefix.
    app_protocol: str | None = None


@dataclass(frozen=True)
class Service:
    meta: ObjectMeta
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]
    cluster_ip: str | None  # None: not assigned; the literal "None": headless

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"


@dataclass(frozen=True)
class ServiceEntryPort:
    number: int
    name: str
    protocol: str
    target_port: int | None


@dataclass(frozen=True)
class ServiceEntry:
    meta: ObjectMeta
    hosts: tuple[str, ...]
    addresses: tuple[str, ...]
    ports: tuple[ServiceEntryPort, ...]
    location: str  # MESH_EXTERNAL | MESH_INTERNAL
    resolution: str  # NONE | STATIC | DNS | DNS_ROUND_ROBIN
    workload_selector: Mapping[str, str] | None
    endpoints: tuple[Mapping[str, Any], ...]  # WorkloadEntry-shaped dicts, camelCase keys as in YAML
    export_to: tuple[str, ...] = ()  # "*" (everyone, also when empty), "." (own namespace), "~" (nobody), names


@dataclass(frozen=True)
class WorkloadEntrySpec:
    address: str
    ports: Mapping[str, int]
    labels: Mapping[str, str]
    network: str
    locality: str
    weight: int
    service_account: str


@dataclass(frozen=True)
class Condition:
    type: str
    status: str
    message: str
    last_probe_time: str
    last_transition_time: str


@dataclass(frozen=True)
class WorkloadGroup:
    meta: ObjectMeta
    group_labels: Mapping[str, str]
    group_annotations: Mapping[str, str]
    template: WorkloadEntrySpec
    probe: Mapping[str, Any] | None


@dataclass(frozen=True)
class WorkloadEntry:
    meta: ObjectMeta
    spec: WorkloadEntrySpec
    conditions: tuple[Condition, ...] = ()

    @property
    def health_checked(self) -> bool:
        return self.meta.annotations.get(HEALTH_CHECKS_ANNOTATION, "").lower() in ("true", "1", "t")

    def condition(self, type_: str) -> Condition | None:
        for c in self.conditions:
            if c.type == type_:
                return c
        return None


MeshObject = Namespace | ServiceAccount | Service | ServiceEntry | WorkloadGroup | WorkloadEntry
T = TypeVar("T", Namespace, ServiceAccount, Service, ServiceEntry, WorkloadGroup, WorkloadEntry)

# kind → (allowed apiVersions, class)
KINDS: dict[str, tuple[tuple[str, ...], type[Any]]] = {
    "Namespace": (("v1",), Namespace),
    "ServiceAccount": (("v1",), ServiceAccount),
    "Service": (("v1",), Service),
    "ServiceEntry": (tuple(f"{ISTIO_NETWORKING}/{v}" for v in ISTIO_VERSIONS), ServiceEntry),
    "WorkloadGroup": (tuple(f"{ISTIO_NETWORKING}/{v}" for v in ISTIO_VERSIONS), WorkloadGroup),
    "WorkloadEntry": (tuple(f"{ISTIO_NETWORKING}/{v}" for v in ISTIO_VERSIONS), WorkloadEntry),
}
_KIND_BY_CLASS: dict[type[Any], str] = {cls: kind for kind, (_, cls) in KINDS.items()}


def kind_of(obj: MeshObject | type[MeshObject]) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return _KIND_BY_CLASS[cls]


def key(obj: MeshObject) -> tuple[str, str, str]:
    """(kind, namespace, name); namespace is "" for the cluster-scoped Namespace."""
    return (kind_of(obj), obj.meta.namespace, obj.meta.name)


@dataclass(frozen=True)
class MeshSnapshot:
    """Immutable view of the store handed to generation; ``version`` grows on every change."""

    version: int
    objects: Mapping[tuple[str, str, str], MeshObject]
    # Generation asks for the same kinds many times per proxy; the snapshot never changes, so sort once.
    _by_kind: dict[str, list[Any]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def of_kind(self, kind: type[T]) -> list[T]:
        name = _KIND_BY_CLASS[kind]
        cached = self._by_kind.get(name)
        if cached is None:
            cached = [o for k, o in sorted(self.objects.items(), key=lambda kv: kv[0]) if k[0] == name]
            self._by_kind[name] = cached
        return list(cached)

    def get(self, kind: type[T], namespace: str, name: str) -> T | None:
        obj = self.objects.get((_KIND_BY_CLASS[kind], namespace, name))
        return obj if isinstance(obj, kind) else None


# --------------------------------------------------------------------------------------------------
# Validation helpers

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
_HEADER_NAME = re.compile(r"^[-_A-Za-z0-9]+$")
_FQDN_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?$")

SERVICE_PROTOCOLS = ("TCP", "UDP", "SCTP")
# Istio's protocol names (case-insensitive on input, canonical spelling kept on output).
ISTIO_PROTOCOLS = {
    p.upper(): p
    for p in (
        "HTTP",
        "HTTPS",
        "GRPC",
        "GRPC-Web",
        "HTTP2",
        "HTTP_PROXY",
        "Mongo",
        "Redis",
        "MySQL",
        "TCP",
        "UDP",
        "TLS",
        "Thrift",
    )
}
SE_LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
SE_RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
_PROBE_METHODS = ("httpGet", "tcpSocket", "exec", "grpc")
_PROBE_INTS = ("initialDelaySeconds", "timeoutSeconds", "periodSeconds", "successThreshold", "failureThreshold")
_WLE_FIELDS = ("address", "ports", "labels", "network", "locality", "weight", "serviceAccount")


def _tname(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"bool {str(v).lower()}"
    if isinstance(v, int):
        return f"int {v}"
    if isinstance(v, float):
        return f"float {v}"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, list):
        return "list"
    if isinstance(v, dict):
        return "map"
    return type(v).__name__


class _Ctx:
    """Where we are (file, object) and the problems found so far."""

    def __init__(self, file: str, obj: str) -> None:
        self.file = file
        self.obj = obj
        self.errors: list[ManifestError] = []

    def err(self, path: str, problem: str) -> None:
        self.errors.append(ManifestError(self.file, self.obj, path, problem))

    # Typed getters: return a usable default after recording a problem, so parsing continues
    # and every problem in the object is reported at once.

    def get_map(self, d: Mapping[str, Any], k: str, path: str, *, required: bool = False) -> dict[str, Any]:
        v = d.get(k)
        if v is None:
            if required:
                self.err(path, "required field is missing, expected a map")
            return {}
        if not isinstance(v, dict):
            self.err(path, f"expected a map, got {_tname(v)}")
            return {}
        return v

    def get_list(self, d: Mapping[str, Any], k: str, path: str, *, required: bool = False) -> list[Any]:
        v = d.get(k)
        if v is None:
            if required:
                self.err(path, "required field is missing, expected a list")
            return []
        if not isinstance(v, list):
            self.err(path, f"expected a list, got {_tname(v)}")
            return []
        return v

    def get_str(self, d: Mapping[str, Any], k: str, path: str, *, required: bool = False, default: str = "") -> str:
        v = d.get(k)
        if v is None or (required and v == ""):
            if required:
                self.err(path, "required field is missing, expected a non-empty string")
            return default
        if not isinstance(v, str):
            self.err(path, f"expected a string, got {_tname(v)}")
            return default
        return v

    def get_int(
        self,
        d: Mapping[str, Any],
        k: str,
        path: str,
        *,
        required: bool = False,
        lo: int = 0,
        hi: int = 2**31 - 1,
        default: int = 0,
    ) -> int:
        v = d.get(k)
        if v is None:
            if required:
                self.err(path, f"required field is missing, expected an integer {lo}-{hi}")
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            self.err(path, f"expected an integer {lo}-{hi}, got {_tname(v)}")
            return default
        if not lo <= v <= hi:
            self.err(path, f"out of range, expected {lo}-{hi}, got {v}")
            return default
        return v

    def string_map(self, d: Mapping[str, Any], k: str, path: str, *, label_rules: bool = False) -> dict[str, str]:
        raw = self.get_map(d, k, path)
        out: dict[str, str] = {}
        for lk, lv in raw.items():
            if not isinstance(lk, str):
                self.err(f"{path}", f"keys must be strings, got {_tname(lk)}")
                continue
            if not isinstance(lv, str):
                # YAML turns `version: 1` or `enabled: true` into non-strings; Kubernetes rejects them.
                self.err(f"{path}.{lk}", f"expected a string (quote it in YAML), got {_tname(lv)}")
                continue
            if label_rules:
                self.check_label(f"{path}.{lk}", lk, lv)
            out[lk] = lv
        return out

    def check_label(self, path: str, k: str, v: str) -> None:
        prefix, _, name = k.rpartition("/")
        if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
            self.err(path, f"label key prefix must be a DNS subdomain, got {prefix!r}")
        if not name or len(name) > 63 or not _LABEL_NAME.match(name):
            self.err(path, f"label key name must be 1-63 alphanumerics, '-', '_' or '.', got {name!r}")
        if len(v) > 63 or not _LABEL_VALUE.match(v):
            self.err(path, f"label value must be at most 63 alphanumerics, '-', '_' or '.', got {v!r}")

    def unknown(self, d: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
        for k in d:
            if k not in allowed:
                self.err(f"{path}.{k}" if path else str(k), f"unknown field, expected one of {', '.join(allowed)}")


def is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _is_cidr(s: str) -> bool:
    try:
        ipaddress.ip_network(s, strict=False)
    except ValueError:
        return False
    return "/" in s


def _is_fqdn(s: str) -> bool:
    s = s.removesuffix(".")
    return 0 < len(s) <= 255 and all(_FQDN_LABEL.match(p) and len(p) <= 63 for p in s.split("."))


# --------------------------------------------------------------------------------------------------
# Parsing


def parse_documents(text: str, source: str) -> list[MeshObject]:
    """Parse a multi-document YAML manifest (also ``kind: List``); raise ManifestErrors listing all problems."""
    errors: list[ManifestError] = []
    try:
        # The C loader (when PyYAML has it) is ~10x faster on large manifests; same safe subset.
        docs = list(yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark is not None else "document"
        problem = getattr(e, "problem", None) or str(e)
        raise ManifestErrors([ManifestError(source, "(YAML)", where, f"not valid YAML: {problem}")]) from None
    out: list[MeshObject] = []
    for i, doc in enumerate(_flatten(docs)):
        if doc is None:
            continue
        obj, errs = _parse_one(doc, source, i + 1)
        errors.extend(errs)
        if obj is not None:
            out.append(obj)
    seen: dict[tuple[str, str, str], int] = {}
    for obj in out:
        k = key(obj)
        if k in seen:
            errors.append(
                ManifestError(
                    source, _describe(k), "metadata.name", "defined more than once in this file, expected unique names"
                )
            )
        seen[k] = 1
    if errors:
        raise ManifestErrors(errors)
    return out


def _flatten(docs: list[Any]) -> Iterator[Any]:
    for d in docs:
        if isinstance(d, dict) and d.get("kind") == "List" and isinstance(d.get("items"), list):
            yield from d["items"]
        else:
            yield d


def _describe(k: tuple[str, str, str]) -> str:
    kind, ns, name = k
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


def _parse_one(doc: Any, source: str, index: int) -> tuple[MeshObject | None, list[ManifestError]]:
    if not isinstance(doc, dict):
        e = ManifestError(
            source, f"document {index}", "(root)", f"expected a map (a Kubernetes object), got {_tname(doc)}"
        )
        return None, [e]
    kind = doc.get("kind")
    meta_raw = doc.get("metadata")
    name = meta_raw.get("name") if isinstance(meta_raw, dict) else None
    ns = meta_raw.get("namespace") if isinstance(meta_raw, dict) else None
    kind_s = kind if isinstance(kind, str) and kind else "?"
    if kind_s == "Namespace":
        label = f"Namespace {name if isinstance(name, str) and name else '?'}"
    else:
        ns_s = ns if isinstance(ns, str) and ns else "default"
        label = f"{kind_s} {ns_s}/{name if isinstance(name, str) and name else '?'}"
    if kind_s == "?":
        label = f"document {index}"
    ctx = _Ctx(source, label)
    if not isinstance(kind, str) or not kind:
        ctx.err("kind", f"required field is missing, expected one of {', '.join(KINDS)}")
        return None, ctx.errors
    if kind not in KINDS:
        ctx.err("kind", f"unsupported kind, expected one of {', '.join(KINDS)}, got {kind!r}")
        return None, ctx.errors
    versions, _ = KINDS[kind]
    api = doc.get("apiVersion")
    if api not in versions:
        ctx.err("apiVersion", f"expected one of {', '.join(versions)}, got {_tname(api)}")
    ctx.unknown(doc, ("apiVersion", "kind", "metadata", "spec", "status"), "")
    meta = _parse_meta(ctx, doc, cluster_scoped=kind == "Namespace", dns_label=kind in ("Namespace", "Service"))
    obj: MeshObject | None
    if kind == "Namespace":
        obj = Namespace(meta)
    elif kind == "ServiceAccount":
        obj = ServiceAccount(meta)
    elif kind == "Service":
        obj = _parse_service(ctx, meta, ctx.get_map(doc, "spec", "spec"))
    elif kind == "ServiceEntry":
        obj = _parse_service_entry(ctx, meta, ctx.get_map(doc, "spec", "spec", required=True))
    elif kind == "WorkloadGroup":
        obj = _parse_workload_group(ctx, meta, ctx.get_map(doc, "spec", "spec", required=True))
    else:
        spec = _parse_wle_spec(ctx, ctx.get_map(doc, "spec", "spec", required=True), "spec", template=False)
        conditions = _parse_conditions(ctx, ctx.get_map(doc, "status", "status"))
        obj = WorkloadEntry(meta, spec, conditions)
    return (None if ctx.errors else obj), ctx.errors


def _parse_meta(ctx: _Ctx, doc: Mapping[str, Any], *, cluster_scoped: bool, dns_label: bool) -> ObjectMeta:
    m = ctx.get_map(doc, "metadata", "metadata", required=True)
    name = ctx.get_str(m, "name", "metadata.name", required=True)
    if name:
        pattern, what, limit = (
            (_DNS1123_LABEL, "a DNS-1123 label (lower-case alphanumerics and '-')", 63)
            if dns_label
            else (_DNS1123_SUBDOMAIN, "a DNS-1123 subdomain (lower-case alphanumerics, '-' and '.')", 253)
        )
        if len(name) > limit or not pattern.match(name):
            ctx.err("metadata.name", f"expected {what} of at most {limit} characters, got {name!r}")
    if cluster_scoped:
        namespace = ""
        if m.get("namespace"):
            ctx.err("metadata.namespace", "Namespace is cluster-scoped, expected no namespace")
    else:
        namespace = ctx.get_str(m, "namespace", "metadata.namespace", default="default") or "default"
        if len(namespace) > 63 or not _DNS1123_LABEL.match(namespace):
            ctx.err("metadata.namespace", f"expected a DNS-1123 label, got {namespace!r}")
    labels = ctx.string_map(m, "labels", "metadata.labels", label_rules=True)
    annotations = ctx.string_map(m, "annotations", "metadata.annotations")
    uid = ctx.get_str(m, "uid", "metadata.uid")
    owners: list[Mapping[str, Any]] = []
    for i, ref in enumerate(ctx.get_list(m, "ownerReferences", "metadata.ownerReferences")):
        p = f"metadata.ownerReferences[{i}]"
        if not isinstance(ref, dict):
            ctx.err(p, f"expected a map, got {_tname(ref)}")
            continue
        for f in ("apiVersion", "kind", "name", "uid"):
            ctx.get_str(ref, f, f"{p}.{f}", required=True)
        owners.append(dict(ref))
    return ObjectMeta(name, namespace, labels, annotations, uid, tuple(owners))


def _parse_service(ctx: _Ctx, meta: ObjectMeta, spec: Mapping[str, Any]) -> Service:
    selector = ctx.string_map(spec, "selector", "spec.selector")
    cluster_ip_raw = ctx.get_str(spec, "clusterIP", "spec.clusterIP")
    cluster_ip: str | None = cluster_ip_raw or None
    if cluster_ip is not None and cluster_ip != "None" and not is_ip(cluster_ip):
        ctx.err("spec.clusterIP", f'expected an IP address or "None" (headless), got {cluster_ip!r}')
    raw_ports = ctx.get_list(spec, "ports", "spec.ports")
    if not raw_ports and cluster_ip != "None":
        ctx.err(
            "spec.ports", "required field is missing, expected at least one port (only headless services may omit it)"
        )
    ports: list[ServicePort] = []
    names: set[str] = set()
    for i, rp in enumerate(raw_ports):
        p = f"spec.ports[{i}]"
        if not isinstance(rp, dict):
            ctx.err(p, f"expected a map, got {_tname(rp)}")
            continue
        name = ctx.get_str(rp, "name", f"{p}.name", required=len(raw_ports) > 1)
        if name:
            if len(name) > 63 or not _DNS1123_LABEL.match(name):
                ctx.err(f"{p}.name", f"expected a DNS-1123 label, got {name!r}")
            if name in names:
                ctx.err(f"{p}.name", f"duplicate port name {name!r}, expected unique names")
            names.add(name)
        port = ctx.get_int(rp, "port", f"{p}.port", required=True, lo=1, hi=65535)
        protocol = ctx.get_str(rp, "protocol", f"{p}.protocol", default="TCP")
        if protocol not in SERVICE_PROTOCOLS:
            ctx.err(f"{p}.protocol", f"expected one of {', '.join(SERVICE_PROTOCOLS)}, got {protocol!r}")
        target: int | str = port
        tp = rp.get("targetPort")
        if isinstance(tp, bool) or (tp is not None and not isinstance(tp, int | str)):
            ctx.err(f"{p}.targetPort", f"expected a port number 1-65535 or a port name, got {_tname(tp)}")
        elif isinstance(tp, int):
            if not 1 <= tp <= 65535:
                ctx.err(f"{p}.targetPort", f"out of range, expected 1-65535, got {tp}")
            target = tp
        elif isinstance(tp, str):
            if tp.isdigit():
                target = int(tp)
                if not 1 <= target <= 65535:
                    ctx.err(f"{p}.targetPort", f"out of range, expected 1-65535, got {tp}")
            elif len(tp) > 15 or not _IANA_SVC_NAME.match(tp):
                ctx.err(f"{p}.targetPort", f"expected a port number or an IANA service name, got {tp!r}")
            else:
                target = tp
        app_protocol = ctx.get_str(rp, "appProtocol", f"{p}.appProtocol") or None
        ports.append(ServicePort(name, port, target, protocol, app_protocol))
    return Service(meta, selector, tuple(ports), cluster_ip)


def _parse_service_entry(ctx: _Ctx, meta: ObjectMeta, spec: Mapping[str, Any]) -> ServiceEntry:
    ctx.unknown(
        spec,
        (
            "hosts",
            "addresses",
            "ports",
            "location",
            "resolution",
            "endpoints",
            "workloadSelector",
            "exportTo",
            "subjectAltNames",
        ),
        "spec",
    )
    hosts: list[str] = []
    raw_hosts = ctx.get_list(spec, "hosts", "spec.hosts", required=True)
    if not raw_hosts and "hosts" in spec:
        ctx.err("spec.hosts", "expected at least one host")
    for i, h in enumerate(raw_hosts):
        p = f"spec.hosts[{i}]"
        if not isinstance(h, str) or not h:
            ctx.err(p, f"expected a host name, got {_tname(h)}")
            continue
        bare = h[2:] if h.startswith("*.") else h
        if h == "*" or "*" in bare or not _is_fqdn(bare):
            ctx.err(p, f"expected a DNS name, optionally with a leading '*.', got {h!r}")
        hosts.append(h)
    addresses: list[str] = []
    for i, a in enumerate(ctx.get_list(spec, "addresses", "spec.addresses")):
        if not isinstance(a, str) or not (is_ip(a) or _is_cidr(a)):
            ctx.err(f"spec.addresses[{i}]", f"expected an IP address or CIDR, got {_tname(a)}")
            continue
        addresses.append(a)
    ports: list[ServiceEntryPort] = []
    numbers: set[int] = set()
    names: set[str] = set()
    for i, rp in enumerate(ctx.get_list(spec, "ports", "spec.ports")):
        p = f"spec.ports[{i}]"
        if not isinstance(rp, dict):
            ctx.err(p, f"expected a map, got {_tname(rp)}")
            continue
        ctx.unknown(rp, ("number", "name", "protocol", "targetPort"), p)
        number = ctx.get_int(rp, "number", f"{p}.number", required=True, lo=1, hi=65535)
        name = ctx.get_str(rp, "name", f"{p}.name", required=True)
        if name and not _DNS1123_LABEL.match(name):
            ctx.err(f"{p}.name", f"expected a DNS-1123 label, got {name!r}")
        if number in numbers:
            ctx.err(f"{p}.number", f"duplicate port number {number}, expected unique numbers")
        if name and name in names:
            ctx.err(f"{p}.name", f"duplicate port name {name!r}, expected unique names")
        numbers.add(number)
        names.add(name)
        proto_raw = ctx.get_str(rp, "protocol", f"{p}.protocol", required=True)
        protocol = ISTIO_PROTOCOLS.get(proto_raw.upper(), "")
        if proto_raw and not protocol:
            ctx.err(
                f"{p}.protocol",
                f"unrecognized protocol, expected one of {', '.join(ISTIO_PROTOCOLS.values())}, got {proto_raw!r}",
            )
        target = ctx.get_int(rp, "targetPort", f"{p}.targetPort", lo=1, hi=65535) if "targetPort" in rp else None
        ports.append(ServiceEntryPort(number, name, protocol or proto_raw, target))
    location = ctx.get_str(spec, "location", "spec.location", default="MESH_EXTERNAL")
    if location not in SE_LOCATIONS:
        ctx.err("spec.location", f"expected one of {', '.join(SE_LOCATIONS)}, got {location!r}")
    resolution = ctx.get_str(spec, "resolution", "spec.resolution", default="NONE")
    if resolution not in SE_RESOLUTIONS:
        ctx.err("spec.resolution", f"expected one of {', '.join(SE_RESOLUTIONS)}, got {resolution!r}")
    selector: dict[str, str] | None = None
    if "workloadSelector" in spec:
        ws = ctx.get_map(spec, "workloadSelector", "spec.workloadSelector")
        ctx.unknown(ws, ("labels",), "spec.workloadSelector")
        selector = ctx.string_map(ws, "labels", "spec.workloadSelector.labels", label_rules=True)
    endpoints: list[dict[str, Any]] = []
    for i, ep in enumerate(ctx.get_list(spec, "endpoints", "spec.endpoints")):
        p = f"spec.endpoints[{i}]"
        if not isinstance(ep, dict):
            ctx.err(p, f"expected a map, got {_tname(ep)}")
            continue
        _parse_wle_spec(ctx, ep, p, template=False, se_resolution=resolution, se_ports=names)
        endpoints.append(dict(ep))
    if selector is not None and endpoints:
        ctx.err("spec.workloadSelector", "workloadSelector and endpoints are mutually exclusive, expected only one")
    if resolution == "STATIC" and addresses is not None:
        for a in addresses:
            if _is_cidr(a) and not a.endswith(("/32", "/128")):
                ctx.err("spec.addresses", f"resolution STATIC needs single addresses, got CIDR {a!r}")
    if resolution in ("DNS", "DNS_ROUND_ROBIN") and not endpoints:
        for i, h in enumerate(hosts):
            if h.startswith("*."):
                ctx.err(
                    f"spec.hosts[{i}]",
                    f"resolution {resolution} without endpoints needs concrete hosts, got wildcard {h!r}",
                )
    if not ports and "ports" in spec:
        ctx.err("spec.ports", "expected at least one port")
    export_to = _parse_export_to(ctx, ctx.get_list(spec, "exportTo", "spec.exportTo"), "spec.exportTo")
    return ServiceEntry(
        meta, tuple(hosts), tuple(addresses), tuple(ports), location, resolution, selector, tuple(endpoints), export_to
    )


EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"


def _parse_export_to(ctx: _Ctx, raw: list[Any], path: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, v in enumerate(raw):
        if not isinstance(v, str) or not (v in (".", "*", "~") or _DNS1123_LABEL.match(v)):
            ctx.err(f"{path}[{i}]", f'expected ".", "*", "~" or a namespace name, got {_tname(v)}')
            continue
        out.append(v)
    if "~" in out and len(out) > 1:
        ctx.err(path, '"~" (export to nobody) cannot be combined with other entries')
    return tuple(out)


def exported_to(obj: Service | ServiceEntry, namespace: str) -> bool:
    """Whether a proxy in ``namespace`` may see this service (Istio's exportTo; default: everyone)."""
    if isinstance(obj, ServiceEntry):
        targets = obj.export_to
    else:
        raw = obj.meta.annotations.get(EXPORT_TO_ANNOTATION, "")
        targets = tuple(t.strip() for t in raw.split(",") if t.strip())
    if not targets or "*" in targets:
        return True
    return any((t == "." and namespace == obj.meta.namespace) or t == namespace for t in targets)


def _parse_wle_spec(
    ctx: _Ctx,
    spec: Mapping[str, Any],
    path: str,
    *,
    template: bool,
    se_resolution: str | None = None,
    se_ports: set[str] | None = None,
) -> WorkloadEntrySpec:
    ctx.unknown(spec, _WLE_FIELDS, path)
    address = ctx.get_str(spec, "address", f"{path}.address")
    if template:
        if address:
            ctx.err(
                f"{path}.address",
                f"the template's address is filled in on registration, expected none, got {address!r}",
            )
    elif not address and se_resolution is None:
        ctx.err(f"{path}.address", "required field is missing, expected an IP address, a host name or unix:// path")
    elif address and not (is_ip(address) or address.startswith("unix://") or _is_fqdn(address)):
        ctx.err(f"{path}.address", f"expected an IP address, a host name or unix:// path, got {address!r}")
    elif address and se_resolution == "STATIC" and not (is_ip(address) or address.startswith("unix://")):
        ctx.err(f"{path}.address", f"resolution STATIC needs an IP address, got {address!r}")
    ports: dict[str, int] = {}
    for pname, pnum in ctx.get_map(spec, "ports", f"{path}.ports").items():
        pp = f"{path}.ports.{pname}"
        if isinstance(pnum, bool) or not isinstance(pnum, int):
            ctx.err(pp, f"expected a port number 1-65535, got {_tname(pnum)}")
            continue
        if not 1 <= pnum <= 65535:
            ctx.err(pp, f"out of range, expected 1-65535, got {pnum}")
            continue
        if se_ports is not None and pname not in se_ports:
            ctx.err(
                pp, f"names no port of this ServiceEntry, expected one of {', '.join(sorted(se_ports)) or '(none)'}"
            )
        ports[str(pname)] = pnum
    labels = ctx.string_map(spec, "labels", f"{path}.labels", label_rules=True)
    network = ctx.get_str(spec, "network", f"{path}.network")
    locality = ctx.get_str(spec, "locality", f"{path}.locality")
    weight = ctx.get_int(spec, "weight", f"{path}.weight", lo=0, hi=2**32 - 1)
    sa = ctx.get_str(spec, "serviceAccount", f"{path}.serviceAccount") or "default"
    if not _DNS1123_SUBDOMAIN.match(sa):
        ctx.err(f"{path}.serviceAccount", f"expected a DNS-1123 subdomain, got {sa!r}")
    return WorkloadEntrySpec(address, ports, labels, network, locality, weight, sa)


def _parse_workload_group(ctx: _Ctx, meta: ObjectMeta, spec: Mapping[str, Any]) -> WorkloadGroup:
    ctx.unknown(spec, ("metadata", "template", "probe"), "spec")
    gm = ctx.get_map(spec, "metadata", "spec.metadata")
    ctx.unknown(gm, ("labels", "annotations"), "spec.metadata")
    group_labels = ctx.string_map(gm, "labels", "spec.metadata.labels", label_rules=True)
    group_annotations = ctx.string_map(gm, "annotations", "spec.metadata.annotations")
    template = _parse_wle_spec(
        ctx, ctx.get_map(spec, "template", "spec.template", required=True), "spec.template", template=True
    )
    probe: dict[str, Any] | None = None
    if spec.get("probe") is not None:
        probe = ctx.get_map(spec, "probe", "spec.probe")
        _check_probe(ctx, probe, "spec.probe")
    return WorkloadGroup(meta, group_labels, group_annotations, template, probe)


def _check_probe(ctx: _Ctx, probe: Mapping[str, Any], path: str) -> None:
    ctx.unknown(probe, (*_PROBE_INTS, *_PROBE_METHODS), path)
    for f in _PROBE_INTS:
        ctx.get_int(probe, f, f"{path}.{f}", lo=0)
    methods = [m for m in _PROBE_METHODS if probe.get(m) is not None]
    if len(methods) != 1:
        got = ", ".join(methods) if methods else "none"
        ctx.err(path, f"expected exactly one of {', '.join(_PROBE_METHODS)}, got {got}")
    for m in methods:
        p = f"{path}.{m}"
        body = ctx.get_map(probe, m, p)
        if m == "httpGet":
            ctx.unknown(body, ("path", "port", "host", "scheme", "httpHeaders"), p)
            ctx.get_int(body, "port", f"{p}.port", required=True, lo=1, hi=65535)
            ctx.get_str(body, "path", f"{p}.path")
            ctx.get_str(body, "host", f"{p}.host")
            scheme = ctx.get_str(body, "scheme", f"{p}.scheme", default="HTTP")
            if scheme.upper() not in ("HTTP", "HTTPS"):
                ctx.err(f"{p}.scheme", f"expected HTTP or HTTPS, got {scheme!r}")
            for i, h in enumerate(ctx.get_list(body, "httpHeaders", f"{p}.httpHeaders")):
                hp = f"{p}.httpHeaders[{i}]"
                if not isinstance(h, dict):
                    ctx.err(hp, f"expected a map with name and value, got {_tname(h)}")
                    continue
                ctx.unknown(h, ("name", "value"), hp)
                hn = ctx.get_str(h, "name", f"{hp}.name", required=True)
                if hn and not _HEADER_NAME.match(hn):
                    ctx.err(f"{hp}.name", f"expected letters, digits, '-' or '_', got {hn!r}")
                ctx.get_str(h, "value", f"{hp}.value")
        elif m == "tcpSocket":
            ctx.unknown(body, ("host", "port"), p)
            ctx.get_int(body, "port", f"{p}.port", required=True, lo=1, hi=65535)
            ctx.get_str(body, "host", f"{p}.host")
        elif m == "exec":
            ctx.unknown(body, ("command",), p)
            cmd = ctx.get_list(body, "command", f"{p}.command", required=True)
            if "command" in body and not cmd:
                ctx.err(f"{p}.command", "expected at least one element")
            for i, c in enumerate(cmd):
                if not isinstance(c, str):
                    ctx.err(f"{p}.command[{i}]", f"expected a string, got {_tname(c)}")
        else:
            ctx.unknown(body, ("port", "service"), p)
            ctx.get_int(body, "port", f"{p}.port", required=True, lo=1, hi=65535)
            ctx.get_str(body, "service", f"{p}.service")


def _parse_conditions(ctx: _Ctx, status: Mapping[str, Any]) -> tuple[Condition, ...]:
    out: list[Condition] = []
    for i, c in enumerate(ctx.get_list(status, "conditions", "status.conditions")):
        p = f"status.conditions[{i}]"
        if not isinstance(c, dict):
            ctx.err(p, f"expected a map, got {_tname(c)}")
            continue
        type_ = ctx.get_str(c, "type", f"{p}.type", required=True)
        st = ctx.get_str(c, "status", f"{p}.status", required=True)
        if st and st not in ("True", "False", "Unknown"):
            ctx.err(f"{p}.status", f'expected "True", "False" or "Unknown", got {st!r}')
        out.append(
            Condition(
                type_,
                st,
                ctx.get_str(c, "message", f"{p}.message"),
                ctx.get_str(c, "lastProbeTime", f"{p}.lastProbeTime"),
                ctx.get_str(c, "lastTransitionTime", f"{p}.lastTransitionTime"),
            )
        )
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Back to Kubernetes shape


def _meta_manifest(m: ObjectMeta, cluster_scoped: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"name": m.name}
    if not cluster_scoped:
        out["namespace"] = m.namespace
    if m.labels:
        out["labels"] = dict(m.labels)
    if m.annotations:
        out["annotations"] = dict(m.annotations)
    if m.uid:
        out["uid"] = m.uid
    if m.owner_references:
        out["ownerReferences"] = [dict(r) for r in m.owner_references]
    return out


def _wle_manifest(s: WorkloadEntrySpec, *, template: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s.address and not template:
        out["address"] = s.address
    if s.ports:
        out["ports"] = dict(s.ports)
    if s.labels:
        out["labels"] = dict(s.labels)
    if s.network:
        out["network"] = s.network
    if s.locality:
        out["locality"] = s.locality
    if s.weight:
        out["weight"] = s.weight
    out["serviceAccount"] = s.service_account
    return out


def to_manifest(obj: MeshObject) -> dict[str, Any]:
    """The object in Kubernetes shape (what ``kubectl get -o yaml`` would show, minus server fields)."""
    kind = kind_of(obj)
    api = "v1" if kind in ("Namespace", "ServiceAccount", "Service") else f"{ISTIO_NETWORKING}/v1"
    out: dict[str, Any] = {"apiVersion": api, "kind": kind, "metadata": _meta_manifest(obj.meta, kind == "Namespace")}
    if isinstance(obj, Service):
        ports = []
        for p in obj.ports:
            d: dict[str, Any] = {"port": p.port, "targetPort": p.target_port, "protocol": p.protocol}
            if p.name:
                d["name"] = p.name
            if p.app_protocol:
                d["appProtocol"] = p.app_protocol
            ports.append(d)
        spec: dict[str, Any] = {"ports": ports}
        if obj.selector:
            spec["selector"] = dict(obj.selector)
        if obj.cluster_ip:
            spec["clusterIP"] = obj.cluster_ip
        out["spec"] = spec
    elif isinstance(obj, ServiceEntry):
        se: dict[str, Any] = {"hosts": list(obj.hosts)}
        if obj.addresses:
            se["addresses"] = list(obj.addresses)
        sports = []
        for sp in obj.ports:
            d = {"number": sp.number, "name": sp.name, "protocol": sp.protocol}
            if sp.target_port is not None:
                d["targetPort"] = sp.target_port
            sports.append(d)
        if sports:
            se["ports"] = sports
        se["location"] = obj.location
        se["resolution"] = obj.resolution
        if obj.workload_selector is not None:
            se["workloadSelector"] = {"labels": dict(obj.workload_selector)}
        if obj.endpoints:
            se["endpoints"] = [dict(e) for e in obj.endpoints]
        if obj.export_to:
            se["exportTo"] = list(obj.export_to)
        out["spec"] = se
    elif isinstance(obj, WorkloadGroup):
        wg: dict[str, Any] = {}
        gm: dict[str, Any] = {}
        if obj.group_labels:
            gm["labels"] = dict(obj.group_labels)
        if obj.group_annotations:
            gm["annotations"] = dict(obj.group_annotations)
        if gm:
            wg["metadata"] = gm
        wg["template"] = _wle_manifest(obj.template, template=True)
        if obj.probe is not None:
            wg["probe"] = dict(obj.probe)
        out["spec"] = wg
    elif isinstance(obj, WorkloadEntry):
        out["spec"] = _wle_manifest(obj.spec)
        if obj.conditions:
            conds = []
            for c in obj.conditions:
                cd: dict[str, Any] = {"type": c.type, "status": c.status}
                if c.message:
                    cd["message"] = c.message
                if c.last_probe_time:
                    cd["lastProbeTime"] = c.last_probe_time
                if c.last_transition_time:
                    cd["lastTransitionTime"] = c.last_transition_time
                conds.append(cd)
            out["status"] = {"conditions": conds}
    return out
