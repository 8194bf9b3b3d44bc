"""Run the real ``vm-agent run`` (a subprocess, real Envoy) against a local mesh, on loopback only.

Every port and socket is chosen per agent so tests can run side by side; the VM's instance IP is a
loopback address of its own (127.0.0.x) so Envoy's inbound listeners do not collide.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.net import free_port, free_tcp_udp_port

REPO = Path(__file__).resolve().parents[2]


def sample_manifests(
    *,
    namespace: str = "vmns",
    group: str = "vmapp",
    service_account: str = "vmsa",
    app_port: int,
    service_port: int,
    probe: str | None = None,
) -> str:
    """A namespace, a WorkloadGroup with a probe and a Service selecting it, and a client WorkloadGroup.

    The client VM calls the service through its own Envoy; a VM does not get a loopback listener for its own
    service (several Envoys share this host's 127.0.0.1), so the call crosses the mesh over mTLS.
    """
    probe_yaml = probe or (
        f"    periodSeconds: 1\n    httpGet:\n      host: 127.0.0.1\n      port: {app_port}\n      path: /ready\n"
    )
    return f"""\
apiVersion: v1
kind: Namespace
metadata: {{name: {namespace}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {service_account}, namespace: {namespace}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: {group}, namespace: {namespace}}}
spec:
  metadata:
    labels: {{app: {group}}}
  template:
    serviceAccount: {service_account}
    ports: {{http: {app_port}}}
  probe:
{probe_yaml}---
apiVersion: v1
kind: Service
metadata: {{name: {group}, namespace: {namespace}}}
spec:
  selector: {{app: {group}}}
  ports:
  - {{name: http, port: {service_port}, targetPort: {app_port}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: clientsa, namespace: {namespace}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: client, namespace: {namespace}}}
spec:
  metadata:
    labels: {{app: client}}
  template:
    serviceAccount: clientsa
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext-api, namespace: {namespace}}}
spec:
  hosts: [api.example.internal]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{{number: 443, name: tls, protocol: TLS}}]
"""


@dataclass
class AgentPorts:
    status: int = field(default_factory=free_port)
    admin: int = field(default_factory=free_port)
    envoy_status: int = field(default_factory=free_port)
    envoy_prometheus: int = field(default_factory=free_port)
    dns: int = field(default_factory=free_tcp_udp_port)


class AgentProcess:
    """One ``vm-agent run`` with its own short work folder (Unix socket paths stay under 107 bytes)."""

    def __init__(
        self,
        config_dir: Path,
        *,
        instance_ip: str,
        upstream_dns: tuple[str, int] | None = None,
        delta: bool = True,
        extra: dict[str, str] | None = None,
        workdir: Path | None = None,
    ) -> None:
        self.config_dir = config_dir
        self.instance_ip = instance_ip
        self.ports = AgentPorts()
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="vma", dir="/tmp"))
        self._own_workdir = workdir is None
        self.state_dir = self.workdir / "state"
        self.proxy_dir = self.workdir / "proxy"
        self.sds_socket = self.workdir / "sds.sock"
        self.log_path = self.workdir / "agent.log"
        resolv = self.workdir / "resolv.conf"
        if upstream_dns is None:
            resolv.write_text("nameserver 127.0.0.53\n")
        else:
            resolv.write_text(f"nameserver {upstream_dns[0]}\n")
        self.resolv_conf = resolv
        proxy_config = (
            f"proxyAdminPort: {self.ports.admin}\n"
            f"statusPort: {self.ports.status}\n"
            f"configPath: {self.proxy_dir}\n"
            "interceptionMode: NONE\n"
            "drainDuration: 2s\n"
            "terminationDrainDuration: 1s\n"
        )
        self.settings: dict[str, str] = {
            "VM_AGENT_SCAN_INTERFACES": "false",
            "ISTIO_SVC_IP": instance_ip,
            "DNS_PROXY_ADDR": f"127.0.0.1:{self.ports.dns}",
            "ENVOY_STATUS_PORT": str(self.ports.envoy_status),
            "ENVOY_PROMETHEUS_PORT": str(self.ports.envoy_prometheus),
            "PROXY_CONFIG": proxy_config,
            "VM_AGENT_SDS_SOCKET": str(self.sds_socket),
            "ISTIO_DELTA_XDS": "true" if delta else "false",
            "POD_NAME": "vm1",
        }
        self.settings.update(extra or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "vm_agent",
            "--log-level",
            "debug",
            "run",
            "--config-dir",
            str(self.config_dir),
            "--state-dir",
            str(self.state_dir),
            "--resolv-conf",
            str(self.resolv_conf),
        ]
        for key, value in self.settings.items():
            cmd += ["--set", f"{key}={value}"]
        return cmd

    def start(self) -> None:
        self._log_file = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG", "VM_AGENT_"))}
        self.proc = subprocess.Popen(
            self.command(), stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)
        )

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.status}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.admin}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_excerpt(self, size: int = 6000) -> str:
        """The log's tail for a failure message, without the readiness lines that crowd out Envoy's own words."""
        lines = [line for line in self.log().splitlines() if "\tstatus\treadiness: " not in line]
        return "\n".join(lines)[-size:]

    def get(self, url: str, timeout: float = 3.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read()
        except (urllib.error.URLError, OSError):
            return 0, b""

    def status(self) -> dict[str, Any]:
        code, body = self.get(self.status_url + "/debug/status")
        return json.loads(body) if code == 200 else {}

    def config_dump(self) -> dict[str, Any]:
        code, body = self.get(self.admin_url + "/config_dump?include_eds", timeout=5)
        return json.loads(body) if code == 200 else {}

    def ready(self) -> bool:
        return self.get(self.status_url + "/healthz/ready")[0] == 200

    def envoy_live(self) -> bool:
        code, body = self.get(self.admin_url + "/ready")
        return code == 200 and body.strip() == b"LIVE"

    async def wait(self, check: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"agent exited ({self.proc.returncode}) waiting for {what}:\n{self.log_excerpt()}")
            if await asyncio.to_thread(check):
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{self.log_excerpt()}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        return self.proc.returncode

    def cleanup(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


def write_vm_files(mesh: Any, *, namespace: str, group: str, out: Path, internal_ip: str) -> Path:
    """The five istioctl files for ``group``, rendered by the mesh exactly as ``vm-agent mesh vm-files`` does."""
    from vm_agent.mesh import model
    from vm_agent.mesh.vmfiles import VmFilesOptions, render_vm_files
    from vm_agent.mesh.vmfiles import write_vm_files as write_files

    wg = next(
        o
        for o in mesh.store.snapshot().of_kind(model.WorkloadGroup)
        if (o.meta.namespace, o.meta.name) == (namespace, group)
    )
    host, port = mesh.xds_address.rsplit(":", 1)
    opts = VmFilesOptions(ingress_ip=host, internal_ip=internal_ip, autoregister=True, xds_port=int(port))
    token = mesh.mint_token(namespace, wg.template.service_account or "default")
    files = render_vm_files(model.to_manifest(wg), token, mesh.root_cert_pem, opts)
    write_files(out, files)
    return out
