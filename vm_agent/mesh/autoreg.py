"""istiod's WorkloadEntry controller: auto-registration on connect, the Healthy condition from health
requests, the disconnected mark and the deletion after a grace period."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import heapq
import time
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vm_agent.logs import get_logger
from vm_agent.mesh.ads import Connection
from vm_agent.mesh.node import NodeInfo
from vm_agent.mesh.store import Doc, ManifestErrors, ObjectStore, rfc3339_nano
from vm_agent.metrics import REGISTRY, Counter

log = get_logger("mesh.wle")

AUTO_REGISTRATION_GROUP = "istio.io/autoRegistrationGroup"
WORKLOAD_CONTROLLER = "istio.io/workloadController"
CONNECTED_AT = "istio.io/connectedAt"
DISCONNECTED_AT = "istio.io/disconnectedAt"
HEALTH_CHECKS_ENABLED = "proxy.istio.io/health-checks-enabled"
LOCALITY_LABEL = "istio-locality"
API_VERSION = "networking.istio.io/v1"

REGISTRATIONS = Counter(
    "vm_agent_mesh_workload_entries_registered_total", "WorkloadEntries auto-registered", registry=REGISTRY
)


def entry_name(group: str, ip: str, network: str) -> str:
    name = f"{group}-{ip.replace(':', '-')}"
    if network:
        name += f"-{network}"
    return name[-253:]


def _parse_time(text: str) -> float | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _merge(*maps: dict[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in maps:
        if m:
            out.update(m)
    return out


class WorkloadEntryController:
    def __init__(self, store: ObjectStore, *, controller_name: str, grace_period_s: float) -> None:
        self._store = store
        self._name = controller_name
        self._grace = grace_period_s
        # (network, ip, group, namespace) → open connections; disconnect work starts at zero.
        self._connections: dict[tuple[str, str, str, str], int] = {}
        self._deadlines: list[tuple[float, str, str]] = []
        self._wake = asyncio.Event()

    # -- connect ----------------------------------------------------------------------------------
    async def on_connect(self, conn: Connection) -> None:
        node = conn.node
        assert node is not None
        if node.auto_register_group:
            self._register(conn, node)
        elif node.workload_entry:
            self._bind_manual(conn, node)

    def _check_identity(self, conn: Connection, namespace: str, service_account: str) -> None:
        ident = conn.identity
        if ident is None:
            raise GRPCError(Status.UNKNOWN, "registration of WorkloadEntry requires a verified identity")
        if ident.namespace != namespace:
            raise GRPCError(
                Status.UNKNOWN,
                f"WorkloadEntry namespace {namespace} does not match verified identity namespace {ident.namespace}",
            )
        if service_account and ident.service_account != service_account:
            raise GRPCError(
                Status.UNKNOWN,
                f"WorkloadEntry service account {service_account} does not match verified identity "
                f"service account {ident.service_account}",
            )

    def _connect_meta(self, doc: Doc) -> None:
        ann = doc.setdefault("metadata", {}).setdefault("annotations", {})
        ann[WORKLOAD_CONTROLLER] = self._name
        ann[CONNECTED_AT] = rfc3339_nano()
        ann.pop(DISCONNECTED_AT, None)

    def _register(self, conn: Connection, node: NodeInfo) -> None:
        group = node.auto_register_group
        if not node.ips or not node.namespace:
            log.error("auto-registration of %s skipped: the proxy has no IP or no namespace", node.node_id)
            return
        ns = node.namespace
        name = entry_name(group, node.ips[0], node.network)
        existing = self._store.get("WorkloadEntry", ns, name)
        if existing is not None:
            self._check_identity(conn, ns, str(existing.get("spec", {}).get("serviceAccount") or ""))
            self._store.update("WorkloadEntry", ns, name, self._connect_meta)
            log.info("updated auto-registered WorkloadEntry %s/%s as connected", ns, name)
        else:
            wg = self._store.get("WorkloadGroup", ns, group)
            if wg is None:
                raise GRPCError(
                    Status.FAILED_PRECONDITION,
                    f"auto-registration WorkloadEntry of {node.proxy_id} failed: "
                    f"cannot find WorkloadGroup {ns}/{group}",
                )
            entry = self._entry_from_group(name, node, wg)
            self._check_identity(conn, ns, str(entry["spec"].get("serviceAccount") or ""))
            self._connect_meta(entry)
            try:
                self._store.apply([entry], source="auto-registration")
            except ManifestErrors as e:
                # Labels from node metadata a real API server would refuse land here.
                raise GRPCError(Status.UNKNOWN, f"auto-registration WorkloadEntry {ns}/{name} is invalid: {e}") from e
            REGISTRATIONS.inc()
            log.info("auto-registered WorkloadEntry %s/%s", ns, name)
        conn.workload_entry = (ns, name)
        key = (node.network, node.ips[0], group, ns)
        self._connections[key] = self._connections.get(key, 0) + 1

    def _entry_from_group(self, name: str, node: NodeInfo, wg: Doc) -> Doc:
        spec_g = wg.get("spec") or {}
        gmeta = spec_g.get("metadata") or {}
        entry_spec: dict[str, Any] = copy.deepcopy(spec_g.get("template") or {})
        entry_spec["address"] = node.ips[0]
        # node metadata > WorkloadGroup.metadata > WorkloadGroup.template
        labels = _merge(entry_spec.get("labels"), gmeta.get("labels"))
        if node.metadata.get("LABELS") is not None:
            labels = _merge(labels, node.labels)
            labels.pop(LOCALITY_LABEL, None)
        if labels:
            entry_spec["labels"] = labels
        if node.network:
            entry_spec["network"] = node.network
        if node.locality:
            entry_spec["locality"] = node.locality
        annotations = _merge({AUTO_REGISTRATION_GROUP: wg["metadata"]["name"]}, gmeta.get("annotations"))
        if node.proxy_config.get("readinessProbe") is not None:
            annotations[HEALTH_CHECKS_ENABLED] = "true"
        meta: dict[str, Any] = {
            "name": name,
            "namespace": node.namespace,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": wg.get("apiVersion", API_VERSION),
                    "kind": "WorkloadGroup",
                    "name": wg["metadata"]["name"],
                    "uid": wg["metadata"].get("uid", ""),
                    "controller": True,
                }
            ],
        }
        if labels:
            meta["labels"] = dict(labels)
        return {"apiVersion": API_VERSION, "kind": "WorkloadEntry", "metadata": meta, "spec": entry_spec}

    def _bind_manual(self, conn: Connection, node: NodeInfo) -> None:
        ns, name = node.namespace, node.workload_entry
        entry = self._store.get("WorkloadEntry", ns, name)
        if entry is None:
            raise GRPCError(Status.UNKNOWN, f"WorkloadEntry {ns}/{name} not found (metadata WORKLOAD_ENTRY)")
        annotations = entry.get("metadata", {}).get("annotations") or {}
        if HEALTH_CHECKS_ENABLED not in annotations:
            # istiod leaves entries it was not asked to health-check alone.
            return
        self._check_identity(conn, ns, str(entry.get("spec", {}).get("serviceAccount") or ""))
        self._store.update("WorkloadEntry", ns, name, self._connect_meta)
        conn.workload_entry = (ns, name)
        key = (node.network, node.ips[0], "", ns)
        self._connections[key] = self._connections.get(key, 0) + 1

    # -- disconnect ---------------------------------------------------------------------------------
    async def on_disconnect(self, conn: Connection) -> None:
        node = conn.node
        if node is None or conn.workload_entry is None:
            return
        key = (node.network, node.ips[0], node.auto_register_group, node.namespace)
        left = self._connections.get(key, 0) - 1
        if left > 0:
            self._connections[key] = left
            return
        self._connections.pop(key, None)
        ns, name = conn.workload_entry

        def mark(doc: Doc) -> None:
            ann = doc.setdefault("metadata", {}).setdefault("annotations", {})
            if ann.get(WORKLOAD_CONTROLLER) != self._name:
                return
            ann.pop(CONNECTED_AT, None)
            ann[DISCONNECTED_AT] = rfc3339_nano()

        if self._store.update("WorkloadEntry", ns, name, mark) is not None:
            log.info("updated auto-registered WorkloadEntry %s/%s as disconnected", ns, name)
            heapq.heappush(self._deadlines, (time.monotonic() + self._grace, ns, name))
            self._wake.set()

    def mark_all_disconnected(self) -> None:
        """After a restart: entries we controlled lost their proxies' connections."""
        now = time.monotonic()

        def mark(doc: Doc) -> None:
            ann = doc.setdefault("metadata", {}).setdefault("annotations", {})
            if ann.get(WORKLOAD_CONTROLLER) == self._name and CONNECTED_AT in ann:
                ann.pop(CONNECTED_AT, None)
                ann[DISCONNECTED_AT] = rfc3339_nano()

        for entry in self._store.select("WorkloadEntry"):
            meta = entry.get("metadata", {})
            ns, name = meta.get("namespace", ""), meta.get("name", "")
            if self._store.update("WorkloadEntry", ns, name, mark) is not None:
                heapq.heappush(self._deadlines, (now + self._grace, ns, name))

    # -- health -------------------------------------------------------------------------------------
    async def on_health(self, conn: Connection, healthy: bool, message: str) -> None:
        if conn.workload_entry is None:
            return
        ns, name = conn.workload_entry
        now = rfc3339_nano()

        def set_condition(doc: Doc) -> None:
            ann = doc.get("metadata", {}).get("annotations") or {}
            if ann.get(WORKLOAD_CONTROLLER) != self._name:
                return
            status = doc.setdefault("status", {})
            conds = [c for c in status.get("conditions") or [] if c.get("type") != "Healthy"]
            cond: dict[str, Any] = {
                "type": "Healthy",
                "status": "True" if healthy else "False",
                "lastProbeTime": now,
                "lastTransitionTime": now,
            }
            if not healthy and message:
                cond["message"] = message
            conds.append(cond)
            status["conditions"] = conds

        if self._store.update("WorkloadEntry", ns, name, set_condition) is None:
            log.warning("health report for %s/%s dropped: the WorkloadEntry does not exist", ns, name)

    # -- cleanup ------------------------------------------------------------------------------------
    def _cleanup(self, ns: str, name: str) -> None:
        entry = self._store.get("WorkloadEntry", ns, name)
        if entry is None:
            return
        ann = entry.get("metadata", {}).get("annotations") or {}
        if CONNECTED_AT in ann or ann.get(WORKLOAD_CONTROLLER) != self._name:
            return
        since = _parse_time(ann.get(DISCONNECTED_AT, ""))
        if since is None or time.time() - since < self._grace - 0.05:
            return
        if AUTO_REGISTRATION_GROUP in ann:
            self._store.delete("WorkloadEntry", ns, name)
            log.info("cleaned up auto-registered WorkloadEntry %s/%s", ns, name)
        else:

            def drop_health(doc: Doc) -> None:
                status = doc.get("status") or {}
                status["conditions"] = [c for c in status.get("conditions") or [] if c.get("type") != "Healthy"]

            self._store.update("WorkloadEntry", ns, name, drop_health)

    def sweep(self) -> None:
        """istiod's periodic pass over every entry (catches disconnects recorded before a restart)."""
        for entry in self._store.select("WorkloadEntry"):
            meta = entry.get("metadata", {})
            self._cleanup(meta.get("namespace", ""), meta.get("name", ""))

    async def run(self) -> None:
        last_sweep = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                while self._deadlines and self._deadlines[0][0] <= now:
                    _, ns, name = heapq.heappop(self._deadlines)
                    self._cleanup(ns, name)
                if now - last_sweep >= 10 * self._grace:
                    self.sweep()
                    last_sweep = now
                wait = 10 * self._grace - (now - last_sweep)
                if self._deadlines:
                    wait = min(wait, self._deadlines[0][0] - now)
                self._wake.clear()
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that races the wake-up.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(wait, 0.01)):
                        await self._wake.wait()
        finally:
            self._deadlines.clear()

    def snapshot(self) -> dict[str, Any]:
        return {
            "connected_proxies": {"/".join(k): v for k, v in self._connections.items()},
            "pending_cleanups": len(self._deadlines),
        }
