"""The control plane's side of the fleet: its WorkloadGroup and Service, and what istiod writes and costs.

* ``EntryWatch`` follows the fleet's WorkloadEntries through the kube-apiserver's watch API (a thread):
  when each appeared, its Healthy condition over time, every status write, deletions.
* ``status_writes`` reads ``apiserver_request_total`` for ``workloadentries/status`` from the
  kube-apiserver's own metrics: the ground truth for what health reports cost.
* ``rss_bytes`` is istiod's resident memory from /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import threading
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.interop.conftest import VmGroup, istioctl_configure
from tests.interop.lab import ControlPlane, LabError, wait_until


@dataclass(frozen=True)
class FleetGroup:
    namespace: str
    name: str
    service_account: str
    app_port: int
    service_port: int
    probe_period_s: int

    @property
    def cluster(self) -> str:
        """The Envoy cluster of the fleet's Service: what every simulated Envoy watches in EDS."""
        return f"outbound|{self.service_port}||{self.name}.{self.namespace}.svc.cluster.local"


def create_group(cp: ControlPlane, g: FleetGroup) -> None:
    cp.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": g.namespace}},
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": g.service_account, "namespace": g.namespace},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadGroup",
            "metadata": {"name": g.name, "namespace": g.namespace},
            "spec": {
                "metadata": {"labels": {"app": g.name}},
                "template": {"serviceAccount": g.service_account, "ports": {"http": g.app_port}},
                "probe": {
                    "periodSeconds": g.probe_period_s,
                    "failureThreshold": 1,
                    "successThreshold": 1,
                    "httpGet": {"path": "/ready", "port": g.app_port},
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": g.name, "namespace": g.namespace},
            "spec": {
                "selector": {"app": g.name},
                "ports": [{"name": "http", "port": g.service_port, "targetPort": g.app_port}],
            },
        },
    )
    wait_until(lambda: cp.istiod_has_config("WorkloadGroup", g.namespace, g.name), 60, "istiod to see the group")
    wait_until(lambda: cp.get("configmap", g.namespace, "istio-ca-root-cert") is not None, 60, "istio-ca-root-cert")


def add_services(cp: ControlPlane, g: FleetGroup, count: int, prefix: str = "svc") -> None:
    """More Services in the fleet's namespace (selecting nothing): NameTable changes every VM receives."""
    service = {"apiVersion": "v1", "kind": "Service"}
    spec = {"selector": {"app": "nothing-selects-this"}, "ports": [{"name": "http", "port": 9090}]}
    items = [
        {
            **service,
            "metadata": {"name": f"{prefix}-{i}" if count > 1 else prefix, "namespace": g.namespace},
            "spec": spec,
        }
        for i in range(count)
    ]
    for start in range(0, len(items), 100):
        cp.apply(*items[start : start + 100])


def vm_files(cp: ControlPlane, g: FleetGroup, out: Path) -> Path:
    group = VmGroup(g.namespace, g.name, g.service_account, g.app_port, g.service_port, "unused.example")
    res = istioctl_configure(cp, group, out)
    if res.returncode != 0:
        raise LabError(f"istioctl x workload entry configure failed ({res.returncode}): {res.stderr}")
    return out


def _api(cp: ControlPlane, path: str, timeout: float | None = 30) -> Any:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the lab's kube-apiserver on loopback, self-signed
    req = urllib.request.Request(cp.server + path, headers={"Authorization": f"Bearer {cp.admin_token}"})
    return urllib.request.urlopen(req, context=ctx, timeout=timeout)


def status_writes(cp: ControlPlane) -> dict[str, float]:
    """kube-apiserver's request counts for WorkloadEntries, by '<verb>' or '<verb> status' (every answer code), and
    '<verb>[ status] conflict' for the 409s among them (istiod retries those)."""
    with _api(cp, "/metrics") as resp:
        text = resp.read().decode()
    out: dict[str, float] = defaultdict(float)
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{") or 'resource="workloadentries"' not in line:
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1 : line.index("}")].split(","))
        verb = labels.get("verb", "").strip('"')
        sub = labels.get("subresource", "").strip('"')
        count = float(line.rsplit(" ", 1)[1])
        out[f"{verb} {sub}".strip()] += count
        if labels.get("code", "").strip('"') == "409":
            out[f"{verb} {sub} conflict".replace("  ", " ")] += count
    return dict(out)


def rss_bytes(cp: ControlPlane) -> int:
    assert cp.istiod is not None
    pid = cp.istiod.popen.pid
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    if comm != "pilot-discovery":
        raise LabError(f"pid {pid} is {comm!r}, not istiod")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LabError(f"no VmRSS in /proc/{pid}/status")


def cpu_seconds(cp: ControlPlane) -> float:
    """istiod's CPU time so far (user + system)."""
    assert cp.istiod is not None
    fields = Path(f"/proc/{cp.istiod.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _healthy(obj: dict[str, Any]) -> str | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Healthy":
            return str(cond.get("status"))
    return None


@dataclass
class Entry:
    added_at: float
    healthy: str | None = None
    status: Any = None
    connected: bool = True
    writes: list[float] = field(default_factory=list)
    """When each status write (a new Healthy condition) was seen."""
    states: list[tuple[float, str | None]] = field(default_factory=list)
    healthy_at: float | None = None


class EntryWatch:
    """The fleet namespace's WorkloadEntries as the kube-apiserver sees them, kept up to date by a watch."""

    def __init__(self, cp: ControlPlane, namespace: str) -> None:
        self._cp = cp
        self._path = f"/apis/networking.istio.io/v1/namespaces/{namespace}/workloadentries"
        self.entries: dict[str, Entry] = {}
        self.deleted: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wle-watch", daemon=True)
        self._resp: Any = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            if self._resp is not None:
                self._resp.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with _api(self._cp, self._path) as resp:
                    listing = json.loads(resp.read())
                version = listing["metadata"]["resourceVersion"]
                with self.lock:
                    for obj in listing.get("items", []):
                        self._apply("MODIFIED" if obj["metadata"]["name"] in self.entries else "ADDED", obj)
                query = f"?watch=1&resourceVersion={version}&timeoutSeconds=3600"
                with _api(self._cp, self._path + query, timeout=None) as resp:
                    self._resp = resp
                    for line in resp:
                        if self._stop.is_set():
                            return
                        event = json.loads(line)
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            with self.lock:
                                self._apply(event["type"], event["object"])
            except Exception:  # the apiserver restarting, a closed watch: list again
                if self._stop.is_set():
                    return
                time.sleep(0.5)

    def _apply(self, kind: str, obj: dict[str, Any]) -> None:
        now = time.monotonic()
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self.entries.pop(name, None)
            self.deleted.append((now, name))
            return
        entry = self.entries.get(name)
        if entry is None:
            entry = self.entries[name] = Entry(added_at=now)
        status = obj.get("status")
        if status and status != entry.status:
            entry.writes.append(now)
        entry.status = status
        healthy = _healthy(obj)
        if healthy != entry.healthy:
            entry.states.append((now, healthy))
            if healthy == "True" and entry.healthy_at is None:
                entry.healthy_at = now
        entry.healthy = healthy
        annotations = obj["metadata"].get("annotations") or {}
        entry.connected = "istio.io/disconnectedAt" not in annotations

    # ----- questions the scenarios ask -----

    def count_ready(self, names: set[str]) -> int:
        """Entries of ``names`` that exist, are connected and Healthy."""
        with self.lock:
            return sum(
                1 for n in names if (e := self.entries.get(n)) is not None and e.healthy == "True" and e.connected
            )

    def writes_between(self, names: set[str], start: float, end: float) -> dict[str, int]:
        with self.lock:
            return {
                n: sum(1 for t in e.writes if start <= t < end) for n in names if (e := self.entries.get(n)) is not None
            }
