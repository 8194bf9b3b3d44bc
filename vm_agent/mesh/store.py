"""The object store of the local mesh: Kubernetes-shaped objects keyed by (kind, namespace, name),
fed by the manifests folder, the admin API and auto-registration, like an API server would be."""

from __future__ import annotations

import copy
import datetime as dt
import ipaddress
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import yaml

from vm_agent.logs import get_logger
from vm_agent.mesh.model import ManifestErrors, MeshObject, MeshSnapshot, parse_documents

log = get_logger("mesh.store")

Key = tuple[str, str, str]
Doc = dict[str, Any]

__all__ = ["Doc", "Key", "ManifestErrors", "ObjectStore", "key_of", "parse_yaml", "rfc3339_nano"]

CLUSTER_SCOPED = frozenset({"Namespace"})
# Fields the server owns; a user's manifest never decides them and comparisons ignore them.
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation")
# The API server's default service CIDR; Services without a clusterIP get one from here.
SERVICE_CIDR = ipaddress.ip_network("10.96.0.0/12")


def rfc3339_nano(t: dt.datetime | None = None) -> str:
    """Go's time.RFC3339Nano (trailing zeros of the fraction dropped), as istiod writes annotations."""
    t = (t or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    frac = f"{t.microsecond:06d}000".rstrip("0")
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def key_of(doc: Doc) -> Key:
    meta = doc.get("metadata") or {}
    kind = str(doc.get("kind", ""))
    ns = "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
    return kind, ns, str(meta.get("name", ""))


def parse_yaml(text: str, source: str) -> list[Doc]:
    """Every object of a multi-document YAML text (also ``kind: List``), validated by the model the way
    the API server would; raises ManifestErrors naming file, object and field."""
    parse_documents(text, source)
    out: list[Doc] = []
    for doc in yaml.safe_load_all(text):
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend(d for d in doc["items"] if d is not None)
        elif doc is not None:
            out.append(doc)
    return out


def _typed(doc: Doc) -> MeshObject:
    objs = parse_documents(yaml.safe_dump(doc), "store")
    return objs[0]


def _user_view(doc: Doc) -> Doc:
    out = copy.deepcopy(doc)
    meta = out.setdefault("metadata", {})
    for f in SERVER_FIELDS:
        meta.pop(f, None)
    out.pop("status", None)
    return out


Listener = Callable[[frozenset[str]], None]


class ObjectStore:
    def __init__(self) -> None:
        self._objects: dict[Key, Doc] = {}
        self._typed: dict[Key, MeshObject] = {}
        self._sources: dict[Key, str] = {}
        self._listeners: list[Listener] = []
        self._rv = 0
        self.version = 0

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def _notify(self, kinds: set[str]) -> None:
        if not kinds:
            return
        self.version += 1
        frozen = frozenset(kinds)
        for listener in list(self._listeners):
            listener(frozen)

    def _stamp(self, key: Key, doc: Doc, previous: Doc | None) -> Doc:
        stored = copy.deepcopy(doc)
        meta = stored.setdefault("metadata", {})
        if key[1]:
            meta["namespace"] = key[1]
        self._rv += 1
        meta["resourceVersion"] = str(self._rv)
        if previous is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta["generation"] = 1
        else:
            pm = previous.get("metadata", {})
            meta["uid"] = pm.get("uid")
            meta["creationTimestamp"] = pm.get("creationTimestamp")
            changed_spec = previous.get("spec") != stored.get("spec")
            meta["generation"] = int(pm.get("generation", 1)) + (1 if changed_spec else 0)
            if "status" not in stored and "status" in previous:
                stored["status"] = copy.deepcopy(previous["status"])
        if key[0] == "Service":
            spec = stored.setdefault("spec", {})
            if not spec.get("clusterIP"):
                old = (previous or {}).get("spec", {}).get("clusterIP")
                spec["clusterIP"] = old or self._allocate_cluster_ip()
        return stored

    def _allocate_cluster_ip(self) -> str:
        used = {d.get("spec", {}).get("clusterIP") for k, d in self._objects.items() if k[0] == "Service"}
        # .0 is the network, .1 is the kubernetes Service, .10 is usually DNS: start after them.
        for offset in range(11, SERVICE_CIDR.num_addresses - 1):
            ip = str(SERVICE_CIDR.network_address + offset)
            if ip not in used:
                return ip
        raise RuntimeError(f"service CIDR {SERVICE_CIDR} exhausted")

    def _store(self, key: Key, doc: Doc) -> None:
        self._objects[key] = doc
        self._typed[key] = _typed(doc)

    def _drop(self, key: Key) -> None:
        self._objects.pop(key, None)
        self._typed.pop(key, None)
        self._sources.pop(key, None)

    def snapshot(self) -> MeshSnapshot:
        return MeshSnapshot(self.version, dict(self._typed))

    def _put(self, doc: Doc, source: str | None) -> str | None:
        key = key_of(doc)
        previous = self._objects.get(key)
        doc = copy.deepcopy(doc)
        if key[1]:
            doc.setdefault("metadata", {})["namespace"] = key[1]
        if previous is not None and key[0] == "Service" and not (doc.get("spec") or {}).get("clusterIP"):
            doc.setdefault("spec", {})["clusterIP"] = previous.get("spec", {}).get("clusterIP")
        if previous is not None and _user_view(previous) == _user_view(doc) and "status" not in doc:
            if source is not None:
                self._sources[key] = source
            return None
        self._store(key, self._stamp(key, doc, previous))
        if source is not None:
            self._sources[key] = source
        return key[0]

    def apply(self, docs: Iterable[Doc], *, source: str | None = None) -> list[Key]:
        """Create or update (kubectl apply semantics: status is kept unless given)."""
        docs = list(docs)
        kinds = {k for k in (self._put(d, source) for d in docs) if k}
        self._notify(kinds)
        return [key_of(d) for d in docs]

    def replace_source(self, source_prefix: str, docs: list[Doc], source_of: Callable[[Doc], str]) -> None:
        """Make the objects that came from ``source_prefix`` (a folder) exactly ``docs``."""
        wanted = {key_of(d) for d in docs}
        kinds: set[str] = set()
        for key, src in list(self._sources.items()):
            if src.startswith(source_prefix) and key not in wanted and key in self._objects:
                self._drop(key)
                kinds.add(key[0])
        for d in docs:
            k = self._put(d, source_of(d))
            if k:
                kinds.add(k)
        self._notify(kinds)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        key: Key = (kind, "" if kind in CLUSTER_SCOPED else namespace, name)
        if key not in self._objects:
            return False
        self._drop(key)
        kinds = {kind}
        # Garbage collection through ownerReferences (an auto-registered WorkloadEntry goes with its group).
        uid_gone = {key}
        for k, d in list(self._objects.items()):
            owners = d.get("metadata", {}).get("ownerReferences") or []
            if any((o.get("kind"), k[1], o.get("name")) in uid_gone for o in owners if isinstance(o, dict)):
                self._drop(k)
                kinds.add(k[0])
        self._notify(kinds)
        return True

    def update(self, kind: str, namespace: str, name: str, mutate: Callable[[Doc], None]) -> Doc | None:
        """Read-modify-write of one object (annotations, status); None if it does not exist."""
        key: Key = (kind, namespace, name)
        current = self._objects.get(key)
        if current is None:
            return None
        doc = copy.deepcopy(current)
        mutate(doc)
        if doc == current:
            return current
        self._store(key, self._stamp(key, doc, current))
        self._notify({kind})
        return self._objects[key]

    def get(self, kind: str, namespace: str, name: str) -> Doc | None:
        doc = self._objects.get((kind, "" if kind in CLUSTER_SCOPED else namespace, name))
        return copy.deepcopy(doc) if doc is not None else None

    def select(self, kind: str | None = None, namespace: str | None = None) -> list[Doc]:
        return [
            copy.deepcopy(d)
            for k, d in sorted(self._objects.items())
            if (kind is None or k[0] == kind) and (namespace is None or k[1] == namespace)
        ]

    def objects(self) -> list[Doc]:
        """Every object (no copy: callers must not modify)."""
        return [d for _, d in sorted(self._objects.items())]

    def namespace_exists(self, namespace: str) -> bool:
        # Kubernetes always has the "default" namespace.
        return namespace == "default" or ("Namespace", "", namespace) in self._objects

    def service_account_exists(self, namespace: str, name: str) -> bool:
        if ("ServiceAccount", namespace, name) in self._objects:
            return True
        # Kubernetes creates a "default" service account in every namespace.
        return name == "default" and self.namespace_exists(namespace)

    def export(self) -> list[dict[str, Any]]:
        """Every object with where it came from, for persisting across restarts."""
        return [{"source": self._sources.get(k), "object": d} for k, d in sorted(self._objects.items())]

    def restore(self, entries: list[dict[str, Any]], where: str) -> list[str]:
        """Put back what ``export`` gave (server fields kept); returns problems with skipped entries."""
        problems: list[str] = []
        for i, entry in enumerate(entries):
            doc = entry.get("object") if isinstance(entry, dict) else None
            if not isinstance(doc, dict):
                problems.append(f"{where}: entry {i}: expected {{source, object}}")
                continue
            key = key_of(doc)
            try:
                self._store(key, copy.deepcopy(doc))
            except ManifestErrors as e:
                problems.append(f"{where}: entry {i}: {e}")
                continue
            if entry.get("source"):
                self._sources[key] = str(entry["source"])
            rv = str(doc.get("metadata", {}).get("resourceVersion", "0"))
            self._rv = max(self._rv, int(rv) if rv.isdigit() else 0)
        self._notify({k[0] for k in self._objects})
        return problems

    def source_of(self, key: Key) -> str | None:
        return self._sources.get(key)
