"""Fixtures for the interop suite: one real control plane per session, a fresh namespace per test."""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.net import free_port
from tests.interop.lab import (
    CLUSTER_ID,
    Binaries,
    ControlPlane,
    LabError,
    cache_dir,
    short_tmp,
    wait_until,
)


@pytest.fixture(scope="session")
def control_plane() -> Iterator[ControlPlane]:
    try:
        bins = Binaries.find()
    except LabError as exc:
        pytest.fail(str(exc), pytrace=False)
    work = short_tmp("vmai-")
    cp = ControlPlane(bins=bins, work=work)
    try:
        cp.start()
    except BaseException:
        cp.stop()
        _keep_logs(work)
        shutil.rmtree(work, ignore_errors=True)
        raise
    try:
        yield cp
    finally:
        cp.stop()
        _keep_logs(work)
        (cache_dir() / "last-run-logs" / "startup.json").write_text(json.dumps(cp.startup_s, indent=1))
        shutil.rmtree(work, ignore_errors=True)


def _keep_logs(work: Path) -> None:
    """Copies the component logs where a failed CI run can be read afterwards."""
    dest = cache_dir() / "last-run-logs"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    for log in work.glob("*.log"):
        shutil.copy(log, dest / log.name)


class App:
    """The VM's application: /ready answers 200 or 503 as the test says; bound to 127.0.0.1 only."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.healthy = True
        app = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code = 200 if app.healthy else 503
                body = b"ok" if app.healthy else b"app says not ready"
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> App:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass(frozen=True)
class VmGroup:
    namespace: str
    name: str
    service_account: str
    app_port: int
    service_port: int
    external_host: str


def make_group(cp: ControlPlane, *, probe: bool = True) -> VmGroup:
    """A fresh namespace with a ServiceAccount, a WorkloadGroup, a Service selecting it and a ServiceEntry."""
    ns = f"vm-{secrets.token_hex(3)}"
    g = VmGroup(
        namespace=ns,
        name="vm-app",
        service_account="vm-sa",
        app_port=free_port(),
        service_port=free_port(),
        external_host=f"api-{ns}.example.internal",
    )
    spec: dict[str, Any] = {
        "metadata": {"labels": {"app": g.name}},
        "template": {"serviceAccount": g.service_account, "ports": {"http": g.app_port}},
    }
    if probe:
        # host 127.0.0.1: the app listens on loopback (no capture here), not on the instance IP 127.0.0.2.
        spec["probe"] = {
            "initialDelaySeconds": 1,
            "periodSeconds": 1,
            "failureThreshold": 1,
            "successThreshold": 1,
            "httpGet": {"path": "/ready", "port": g.app_port, "host": "127.0.0.1"},
        }
    cp.apply(
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": g.service_account, "namespace": ns}},
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadGroup",
            "metadata": {"name": g.name, "namespace": ns},
            "spec": spec,
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": g.name, "namespace": ns},
            "spec": {
                "selector": {"app": g.name},
                "ports": [{"name": "http", "port": g.service_port, "targetPort": g.app_port}],
            },
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "ext-api", "namespace": ns},
            "spec": {
                "hosts": [g.external_host],
                "location": "MESH_EXTERNAL",
                "resolution": "DNS",
                "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
            },
        },
    )
    # istiod must hold the WorkloadGroup before a VM of it connects (else FailedPrecondition), and its
    # namespace controller writes the root certificate istioctl copies.
    wait_until(
        lambda: cp.istiod_has_config("WorkloadGroup", ns, g.name), 30, f"istiod to see WorkloadGroup {ns}/vm-app"
    )
    wait_until(lambda: cp.get("configmap", ns, "istio-ca-root-cert") is not None, 30, f"istio-ca-root-cert in {ns}")
    return g


@pytest.fixture
def group(control_plane: ControlPlane) -> VmGroup:
    return make_group(control_plane)


def istioctl_configure(cp: ControlPlane, g: VmGroup, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        str(cp.bins.istioctl),
        f"--kubeconfig={cp.kubeconfig}",
        "x",
        "workload",
        "entry",
        "configure",
        f"--name={g.name}",
        f"--namespace={g.namespace}",
        f"--clusterID={CLUSTER_ID}",
        "--autoregister",
        "--ingressIP=127.0.0.1",
        "--internalIP=127.0.0.2",
        f"-o={out}",
        *extra,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def vm_files(control_plane: ControlPlane, group: VmGroup) -> Iterator[Path]:
    out = short_tmp("vmaf-")
    try:
        res = istioctl_configure(control_plane, group, out)
        if res.returncode != 0:
            raise LabError(f"istioctl x workload entry configure failed ({res.returncode}): {res.stderr}")
        yield out
    finally:
        shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def app(group: VmGroup) -> Iterator[App]:
    with App(group.app_port) as a:
        yield a


@contextlib.contextmanager
def timed(record: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.monotonic()
    try:
        yield
    finally:
        record[key] = time.monotonic() - t0
