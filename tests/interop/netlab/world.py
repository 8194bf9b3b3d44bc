"""The single-network lab of the data-plane issue: a real istiod in its own namespace and four hosts on one bridge.

    namespace      address      what runs there
    cluster        10.77.0.2    etcd, kube-apiserver, istiod (TLS xDS + CA on :15012)
    dns            10.77.0.53   dnsmasq: the upstream resolver for names outside the mesh
    forum-v1       10.77.0.11   vm-agent + Envoy (uid 1337), forum app v1 (uid 1500)   WorkloadGroup forum/forum
    forum-v2       10.77.0.12   vm-agent + Envoy (uid 1337), forum app v2 (uid 1500)   WorkloadGroup forum/forum
    webapp         10.77.0.21   vm-agent + Envoy (uid 1337), webapp app   (uid 1500)   WorkloadGroup webapp/webapp
    outsider       10.77.0.30   a plain host, no agent: the app only

The bridge lives in a namespace of its own with forwarding off: a packet for a ClusterIP or a 240.240/16 address
that a VM's capture did not take goes nowhere.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tests.interop.lab import (
    CLUSTER_ID,
    WLE,
    Binaries,
    ControlPlane,
    LabError,
    cache_dir,
    healthy_condition,
    short_tmp,
    wait_until,
)
from tests.interop.netlab.netns import Host, Topology
from tests.interop.netlab.vm import HTTP_PORT, TCP_PORT, Vm, lab_python

T = TypeVar("T")
NET = "10.77.0.0/24"
HELM_DEFAULT_MESH = "defaultProviders:\n  metrics:\n  - prometheus\n"
ISTIOD_IP = "10.77.0.2"
DNS_IP = "10.77.0.53"
OUTSIDE_NAME = "outsider.lab.test"
"""A name only the upstream resolver knows (answered with the outsider's address)."""
SHOP_HOST = "shop.external.test"
"""A ServiceEntry host without addresses: istiod allocates it a 240.240/16 address; its endpoint is the outsider."""
FORUM_HOST = "forum.forum.svc.cluster.local"
VM_ADDRESSES = {"forum-v1": 11, "forum-v2": 12, "webapp": 21}
NETWORK1 = "network1"
"""The cluster's network (istio-system's topology.istio.io/network label), shared by the first three VMs."""
VM_VERSIONS = {"forum-v1": "v1", "forum-v2": "v2"}


@dataclass
class Figures:
    """Measured figures of the run, written to <cache>/last-run-logs/netlab-figures.json for docs/interop.md."""

    values: dict[str, Any] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, key: str, value: Any) -> None:
        with self.lock:
            self.values[key] = value

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.values, indent=1, sort_keys=True))


def missing_tools() -> str | None:
    """The exact reason the lab cannot run here, or None."""
    if shutil.which("dnsmasq") is None:
        return "the network lab needs dnsmasq as the upstream resolver (scripts/install-system-deps.sh installs it)"
    if not Path("/usr/bin/python3.11").exists():
        return "the network lab runs vm-agent as the proxy user with Debian's /usr/bin/python3.11 (apt-get install python3.11)"
    if shutil.which("ss") is None:
        return "the network lab needs `ss` (iproute2)"
    return None


def group_objects(
    ns: str, group: str, sa: str, *, app_label: str, network: str = NETWORK1, probe: bool = True
) -> list[dict[str, Any]]:
    """A namespace with a ServiceAccount, a WorkloadGroup on ``network`` (istioctl writes it as ISTIO_META_NETWORK)
    and a Service selecting the group's WorkloadEntries."""
    spec: dict[str, Any] = {
        "metadata": {"labels": {"app": app_label}},
        "template": {
            "serviceAccount": sa,
            "network": network,
            "ports": {"http": HTTP_PORT, "tcp-echo": TCP_PORT},
        },
    }
    if probe:
        spec["probe"] = {
            "initialDelaySeconds": 1,
            "periodSeconds": 1,
            "failureThreshold": 1,
            "successThreshold": 1,
            "httpGet": {"path": "/ready", "port": HTTP_PORT},
        }
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": ns}},
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadGroup",
            "metadata": {"name": group, "namespace": ns},
            "spec": spec,
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": group, "namespace": ns},
            "spec": {
                "selector": {"app": app_label},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": HTTP_PORT},
                    {"name": "tcp-echo", "port": TCP_PORT, "targetPort": TCP_PORT, "appProtocol": "tcp"},
                ],
            },
        },
    ]


def forum_by_version(v1: int, v2: int) -> list[dict[str, Any]]:
    """The VM guide's migration step: a DestinationRule with subsets by ``version`` and a VirtualService that
    weighs them ``v1``/``v2``."""
    return [
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "DestinationRule",
            "metadata": {"name": "forum", "namespace": "forum"},
            "spec": {
                "host": FORUM_HOST,
                "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"}}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "forum", "namespace": "forum"},
            "spec": {
                "hosts": [FORUM_HOST],
                "http": [
                    {
                        "route": [
                            {"destination": {"host": FORUM_HOST, "subset": "v1"}, "weight": v1},
                            {"destination": {"host": FORUM_HOST, "subset": "v2"}, "weight": v2},
                        ]
                    }
                ],
            },
        },
    ]


def remove_forum_routing(cp: ControlPlane) -> None:
    cp.kubectl("-n", "forum", "delete", "virtualservice", "forum", "--ignore-not-found")
    cp.kubectl("-n", "forum", "delete", "destinationrule", "forum", "--ignore-not-found")


class NetLab:
    """Builds the lab (``start``) and tears every piece down (``destroy``), also after a failure half-way."""

    def __init__(self, bins: Binaries) -> None:
        self.bins = bins
        self.work = short_tmp("vmlab-")
        self.work.chmod(0o755)
        self.topo = Topology()
        self.cp: ControlPlane | None = None
        self.vms: dict[str, Vm] = {}
        self.outsider_app: Vm | None = None
        self.dnsmasqs: list[subprocess.Popen[bytes]] = []
        self.figures = Figures()
        self.stages: dict[str, float] = {}
        self.files: dict[str, Path] = {}
        self.python: Path | None = None

    # ------------------------------------------------------------------ building

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Times one step of the lab's start into the figures (``lab_start_stages_s``)."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.stages[name] = round(time.monotonic() - t0, 1)
            self.figures.record("lab_start_stages_s", dict(self.stages))

    def start(self) -> None:
        t0 = time.monotonic()
        with self.stage("namespaces, bridge, dnsmasq"):
            self.python = lab_python(self.work)
            self.topo.network("lan", NET)
            cluster = self.topo.host("cluster", {"lan": 2})
            dns = self.topo.host("dns", {"lan": 53})
            hosts = {role: self.topo.host(role, {"lan": index}) for role, index in VM_ADDRESSES.items()}
            outsider = self.topo.host("outsider", {"lan": 30})
            self.start_dnsmasq(dns, DNS_IP)
        with self.stage("control plane"):
            (self.work / "cp").mkdir()
            self.cp = ControlPlane(bins=self.bins, work=self.work / "cp", netns=cluster)
            # As a default install has it (helm's telemetry.v2.prometheus.enabled): istiod pushes Istio's metrics.
            self.cp.mesh_extra = HELM_DEFAULT_MESH
            self.cp.start()
        with self.stage("Istio objects applied and seen by istiod"):
            self._apply_objects(outsider)
        with self.stage("istioctl files and VM folders"):
            self._make_vms(hosts)
            outsider.write_etc("resolv.conf", f"nameserver {DNS_IP}\n")
            outsider.write_etc("hosts", "127.0.0.1 localhost\n")
            assert self.python is not None
            self.outsider_app = Vm(outsider, work=self.work, files=self.files["webapp"], python=self.python)
            self.outsider_app.start_app()
        with self.stage("vm-agent netfilter apply"), ThreadPoolExecutor(max_workers=3) as pool:
            list(pool.map(self._apply_capture, self.vms.values()))
        with self.stage("apps and agents started"):
            # Started from this thread: a parent-death signal fires when the *thread* that forked the child ends.
            for vm in self.vms.values():
                vm.start_agent()
                vm.start_app()
        with self.stage("VMs registered, Healthy, serving"):
            for vm in self.vms.values():
                self.wait_healthy(vm, True, 120)
            self.wait_serving(self.vms["webapp"], f"http://{FORUM_HOST}/", {"v1", "v2"}, 120)
        self.figures.record("lab_start_s", round(time.monotonic() - t0, 1))

    def _apply_objects(self, outsider: Host) -> None:
        cp = self.cp
        assert cp is not None
        cp.apply(
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "istio-system", "labels": {"topology.istio.io/network": NETWORK1}},
            },
            *group_objects("forum", "forum", "forum", app_label="forum"),
            *group_objects("webapp", "webapp", "webapp", app_label="webapp"),
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {"name": "shop", "namespace": "webapp"},
                "spec": {
                    "hosts": [SHOP_HOST],
                    "location": "MESH_EXTERNAL",
                    "resolution": "STATIC",
                    "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                    "endpoints": [{"address": outsider.ip, "ports": {"http": HTTP_PORT}}],
                },
            },
        )
        for ns in ("forum", "webapp"):
            # istiod must hold the WorkloadGroup before a VM of it connects, and istioctl copies the root cert.
            wait_until(lambda ns=ns: cp.istiod_has_config("WorkloadGroup", ns, ns), 60, f"istiod to see {ns}/{ns}")
            wait_until(
                lambda ns=ns: cp.get("configmap", ns, "istio-ca-root-cert") is not None, 60, f"root cert in {ns}"
            )

    def _make_vms(self, hosts: dict[str, Host]) -> None:
        assert self.python is not None
        for role, host in hosts.items():
            group = "forum" if role.startswith("forum") else role
            # istioctl runs once per VM, for the VM's own address (ISTIO_SVC_IP), as the VM guide does.
            self.files[role] = self.istioctl_files(group, group, host.ip)
            self._etc_files(host, self.files[role])
            self.vms[role] = Vm(
                host,
                work=self.work,
                files=self.files[role],
                python=self.python,
                version=VM_VERSIONS.get(role, ""),
                app_name=group,
            )

    def start_dnsmasq(self, dns: Host, address: str) -> None:
        """dnsmasq on ``address``: the resolver of that network, knowing only names outside the mesh."""
        log = (self.work / "dnsmasq.log").open("ab")
        argv = [
            *dns.exec_prefix(), "setpriv", "--pdeathsig", "KILL", "--",
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            "--bind-interfaces", f"--listen-address={address}", f"--host-record={OUTSIDE_NAME},10.77.0.30",
            "--local=/lab.test/", "--local=/cluster.local/", "--log-queries", "--log-facility=-", "--pid-file=",
            "--user=root",
        ]  # fmt: skip
        self.dnsmasqs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT))
        log.close()

    def dnsmasq_log(self) -> str:
        return (self.work / "dnsmasq.log").read_text(errors="replace")

    def istioctl_files(
        self, group: str, namespace: str, vm_ip: str, *, ingress_ip: str = ISTIOD_IP, autoregister: bool = True
    ) -> Path:
        """``istioctl x workload entry configure`` for one VM; ``ingress_ip`` is where its hosts file puts istiod."""
        assert self.cp is not None and self.cp.netns is not None
        out = self.work / "istioctl" / f"{group}-{vm_ip}"
        out.mkdir(parents=True)
        argv = [
            *self.cp.netns.exec_prefix(),
            str(self.bins.istioctl), f"--kubeconfig={self.cp.kubeconfig}", "x", "workload", "entry", "configure",
            f"--name={group}", f"--namespace={namespace}", f"--clusterID={CLUSTER_ID}",
            *(["--autoregister"] if autoregister else []),
            f"--ingressIP={ingress_ip}", f"--internalIP={vm_ip}", f"-o={out}",
        ]  # fmt: skip
        res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        if res.returncode != 0:
            raise LabError(f"istioctl x workload entry configure failed ({res.returncode}): {res.stderr}")
        return out

    def _etc_files(self, host: Host, files: Path) -> None:
        # The VM guide: `cat hosts >> /etc/hosts`; resolv.conf names the network's resolver.
        host.write_etc("hosts", "127.0.0.1 localhost\n" + (files / "hosts").read_text())
        host.write_etc("resolv.conf", f"nameserver {DNS_IP}\n")

    def _apply_capture(self, vm: Vm) -> None:
        res = vm.netfilter("apply")
        if res.returncode != 0:
            raise LabError(f"{vm.name}: vm-agent netfilter apply failed ({res.returncode}): {res.stderr}{res.stdout}")

    # ------------------------------------------------------------------ observing

    def entry_name(self, vm: Vm) -> str:
        """istiod's name for an auto-registered entry: group-address, plus -network when the VM has one."""
        group = "forum" if vm.name.startswith("forum") else vm.name
        network = vm.cluster_env().get("ISTIO_META_NETWORK", "")
        return f"{group}-{vm.host.ip}" + (f"-{network}" if network else "")

    def entry(self, vm: Vm) -> dict[str, Any] | None:
        assert self.cp is not None
        ns = "forum" if vm.name.startswith("forum") else vm.name
        return self.cp.get(WLE, ns, self.entry_name(vm))

    def wait_healthy(self, vm: Vm, healthy: bool, timeout: float) -> float:
        t0 = time.monotonic()
        want = "True" if healthy else "False"

        def check() -> bool:
            vm.must_be_alive()
            cond = healthy_condition(self.entry(vm))
            return cond is not None and cond.get("status") == want

        wait_until(check, timeout, f"WorkloadEntry of {vm.name} Healthy={want}")
        return time.monotonic() - t0

    def wait_serving(self, client: Vm, url: str, versions: set[str], timeout: float, *, concurrency: int = 1) -> None:
        """Until requests from ``client`` to ``url`` have been answered by every version in ``versions``.

        Through an east-west gateway (L4, SNI passthrough) Envoy balances per connection, not per request: pass a
        ``concurrency`` that makes it open several."""
        seen: set[str] = set()
        last: list[dict[str, Any]] = []

        def check() -> bool:
            client.must_be_alive()
            last[:] = client.app("get", url=url, count=max(10, 2 * concurrency), concurrency=concurrency, timeout=3)[
                "results"
            ]
            for r in last:
                if r.get("status") == 200 and r.get("version") is not None:
                    seen.add(r["version"])
            return versions <= seen

        try:
            wait_until(check, timeout, f"{client.name} reaching {url} on {sorted(versions)}", interval=0.5)
        except AssertionError as exc:
            sample = [{k: r.get(k) for k in ("status", "version", "error", "body")} for r in last[:3]]
            raise AssertionError(f"{exc}; seen {sorted(seen)}; last answers {sample}") from None

    def versions(self, client: Vm, url: str, count: int, *, concurrency: int = 1) -> set[str | None]:
        """Which versions answered a fresh batch of ``count`` requests (None for a failed request)."""
        results = client.app("get", url=url, count=count, concurrency=concurrency, timeout=3)["results"]
        return {r.get("version") for r in results}

    def until_value(self, check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.5) -> T:
        """``check``'s first non-empty value within ``timeout``."""
        value: T = wait_until(check, timeout, what, interval)
        return value

    def until(self, check: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> float:
        """Seconds until ``check`` holds."""
        t0 = time.monotonic()
        wait_until(check, timeout, what, interval)
        return time.monotonic() - t0

    # ------------------------------------------------------------------ teardown

    def save_logs(self) -> None:
        dest = cache_dir() / "last-run-logs" / "netlab"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True, exist_ok=True)
        for log in [*self.work.glob("*/*.log"), *self.work.glob("*.log"), *self.work.glob("cp/*.log")]:
            shutil.copy(log, dest / f"{log.parent.name}-{log.name}")
        self.figures.save(cache_dir() / "last-run-logs" / "netlab-figures.json")

    def destroy(self) -> None:
        try:
            for vm in [*self.vms.values(), *([self.outsider_app] if self.outsider_app else [])]:
                vm.stop()
            if self.cp is not None:
                self.cp.stop()
            for proc in self.dnsmasqs:
                if proc.poll() is None:
                    proc.kill()
            self.save_logs()
        finally:
            self.topo.destroy()
            shutil.rmtree(self.work, ignore_errors=True)


class RequestStream:
    """A steady stream of requests (or lookups) made by ``client``'s app; ``records`` is filled when it ends."""

    _ids = 0

    def __init__(
        self, client: Vm, target: str, *, kind: str = "http", interval: float = 0.02, timeout: float = 5
    ) -> None:
        RequestStream._ids += 1
        self.client = client
        self.id = f"s{RequestStream._ids}"
        self.args: dict[str, Any] = {"kind": kind, "target": target, "interval": interval, "timeout": timeout}
        self.records: list[dict[str, Any]] = []

    def __enter__(self) -> RequestStream:
        self.client.app("stream_start", 120, id=self.id, **self.args)
        return self

    def __exit__(self, *exc: object) -> None:
        self.records = self.client.app("stream_stop", id=self.id)["records"]

    def failures(self) -> list[dict[str, Any]]:
        if self.args["kind"] == "http":
            return [r for r in self.records if r.get("status") != 200]
        return [r for r in self.records if "error" in r]

    def summary(self) -> dict[str, Any]:
        n = len(self.records)
        bad = len(self.failures())
        return {"requests": n, "failed": bad, "success_pct": round(100.0 * (n - bad) / n, 2) if n else None}
