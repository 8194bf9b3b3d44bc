"""The object store of the local mesh: Kubernetes-shaped objects keyed by (kind, namespace, name),
fed by the manifests folder, the admin API and auto-registration, like an API server would be."""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import yaml

from vm_agent.logs import get_logger

log = get_logger("mesh.store")

Key = tuple[str, str, str]
Doc = dict[str, Any]

# kind → accepted apiVersions; Namespace is the only cluster-scoped kind.
KINDS: dict[str, tuple[str, ...]] = {
    "Namespace": ("v1",),
    "ServiceAccount": ("v1",),
    "Service": ("v1",),
    "ServiceEntry": ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
    "WorkloadGroup": ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
    "WorkloadEntry": ("networking.istio.io/v1", "networking.istio.io/v1beta1", "networking.istio.io/v1alpha3"),
}
CLUSTER_SCOPED = frozenset({"Namespace"})
# Fields the server owns; a user's manifest never decides them and comparisons ignore them.
SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation")


class ManifestError(ValueError):
    """One or more problems, each naming file, object and field."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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


def _where(source: str, index: int, doc: Any) -> str:
    if isinstance(doc, dict):
        kind, ns, name = key_of(doc)
        obj = f"{kind or '?'} {ns + '/' if ns else ''}{name or '?'}"
    else:
        obj = "?"
    return f"{source}: document {index + 1} ({obj})"


def validate_doc(doc: Any, where: str) -> list[str]:
    """Shape checks every object must pass before it can enter the store."""
    if not isinstance(doc, dict):
        return [f"{where}: expected a mapping with apiVersion, kind, metadata"]
    problems: list[str] = []
    kind = doc.get("kind")
    if kind not in KINDS:
        problems.append(f"{where}: field kind: {kind!r} is not one of {sorted(KINDS)}")
        return problems
    if doc.get("apiVersion") not in KINDS[kind]:
        problems.append(f"{where}: field apiVersion: {doc.get('apiVersion')!r}, expected one of {list(KINDS[kind])}")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        problems.append(f"{where}: field metadata: expected a mapping with name")
        return problems
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        problems.append(f"{where}: field metadata.name: required, a non-empty string")
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and (
            not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        ):
            problems.append(f"{where}: field metadata.{field}: expected a map of strings to strings")
    spec = doc.get("spec")
    if spec is not None and not isinstance(spec, dict):
        problems.append(f"{where}: field spec: expected a mapping")
    return problems


def parse_yaml(text: str, source: str) -> list[Doc]:
    """Every document of a multi-document YAML/JSON text, validated; raises ManifestError."""
    try:
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise ManifestError([f"{source}: not valid YAML: {e}"]) from e
    docs: list[Doc] = []
    problems: list[str] = []
    for i, doc in enumerate(raw):
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            items = doc["items"]
        else:
            items = [doc]
        for item in items:
            where = _where(source, i, item)
            found = validate_doc(item, where)
            problems += found
            if not found:
                docs.append(item)
    if problems:
        raise ManifestError(problems)
    return docs


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
        return stored

    def _put(self, doc: Doc, source: str | None) -> str | None:
        key = key_of(doc)
        previous = self._objects.get(key)
        if previous is not None and _user_view(previous) == _user_view(doc) and "status" not in doc:
            if source is not None:
                self._sources[key] = source
            return None
        self._objects[key] = self._stamp(key, doc, previous)
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
                del self._objects[key]
                del self._sources[key]
                kinds.add(key[0])
        for d in docs:
            k = self._put(d, source_of(d))
            if k:
                kinds.add(k)
        self._notify(kinds)

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        key: Key = (kind, "" if kind in CLUSTER_SCOPED else namespace, name)
        if self._objects.pop(key, None) is None:
            return False
        self._sources.pop(key, None)
        kinds = {kind}
        # Garbage collection through ownerReferences (an auto-registered WorkloadEntry goes with its group).
        uid_gone = {key}
        for k, d in list(self._objects.items()):
            owners = d.get("metadata", {}).get("ownerReferences") or []
            if any((o.get("kind"), k[1], o.get("name")) in uid_gone for o in owners if isinstance(o, dict)):
                del self._objects[k]
                self._sources.pop(k, None)
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
        self._objects[key] = self._stamp(key, doc, current)
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

    def source_of(self, key: Key) -> str | None:
        return self._sources.get(key)
