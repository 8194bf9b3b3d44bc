"""Istio's own pilot-agent as the benchmarks' peer (bench_startup, bench_dns).

The binary is the one the interop build makes (tests/interop/build.sh, never committed here).  It runs
with the istioctl files the local mesh renders, against that mesh, laid out the way istio-start.sh
lays them out on a VM: a fresh root folder as working directory holding etc/certs, the token,
etc/istio/config/mesh and the Envoy bootstrap template istio-sidecar ships.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.request import urlopen

from tests.helpers.net import free_port
from vm_agent.envoy_binary import find_envoy_binary

INTEROP_CACHE = Path(os.environ.get("VM_AGENT_INTEROP_CACHE", Path.home() / ".cache/vm-agent-interop"))
PILOT_AGENT = INTEROP_CACHE / "bin/pilot-agent"


def istio_bootstrap_template() -> Path | None:
    """pilot-agent renders Envoy's bootstrap from the template istio-sidecar ships; take it from the Go module
    cache the interop build filled (never committed here)."""
    pin = INTEROP_CACHE / "bin" / "pilot-discovery.pin"
    version = pin.read_text().split()[0] if pin.exists() else "v0.0.0-20260827124520-eed52ebb66ad"
    try:
        out = subprocess.run(
            ["go", "mod", "download", "-json", f"istio.io/istio@{version}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
            env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/local/go/bin"},
        )
        folder = Path(json.loads(out.stdout)["Dir"])
    except (OSError, subprocess.SubprocessError, KeyError, ValueError):
        return None
    template = folder / "tools/packaging/common/envoy_bootstrap.json"
    return template if template.exists() else None


class PilotAgent:
    def __init__(self, proc: subprocess.Popen[bytes], root: Path, admin_port: int, status_port: int) -> None:
        self.proc = proc
        self.root = root
        self.admin_port = admin_port
        self.status_port = status_port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def live(self) -> bool:
        """Envoy's admin /ready says LIVE."""
        try:
            with urlopen(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1) as r:
                return bool(r.read().strip() == b"LIVE")
        except OSError:
            return False

    def ready(self) -> bool:
        """The agent's /healthz/ready answers 200."""
        try:
            with urlopen(f"http://127.0.0.1:{self.status_port}/healthz/ready", timeout=1) as r:
                return int(r.status) == 200
        except OSError:
            return False

    def log_tail(self, chars: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "pilot-agent.log").read_text(errors="replace")[-chars:]
        return ""


@contextlib.contextmanager
def pilot_agent(
    mesh: Any,
    files: Path,
    *,
    instance_ip: str,
    dns_address: tuple[str, int] | None = None,
    resolv_conf: str | None = None,
    cpus: str | None = None,
) -> Iterator[PilotAgent]:
    """pilot-agent started with the VM files in ``files`` against ``mesh``; stopped and cleaned up on exit.

    ``dns_address`` is where its DNS proxy listens (DNS_PROXY_ADDR; the files turn DNS capture on).
    ``resolv_conf`` is the text its DNS proxy reads as /etc/resolv.conf: it has no setting for another
    file, so that one is bind-mounted over /etc/resolv.conf in a mount namespace of its own (root only).
    ``cpus`` pins it (and the Envoy it starts) with taskset.  Raises FileNotFoundError when the binary or
    Envoy's bootstrap template is missing.
    """
    if not PILOT_AGENT.exists():
        raise FileNotFoundError(f"pilot-agent not found at {PILOT_AGENT} (run make interop)")
    template = istio_bootstrap_template()
    if template is None:
        raise FileNotFoundError("Envoy's bootstrap template from istio.io/istio is not in the Go module cache")
    root = Path(tempfile.mkdtemp(prefix="pa", dir="/tmp"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        for sub in (
            "etc/certs",
            "var/run/secrets/tokens",
            "etc/istio/config",
            "etc/istio/proxy",
            "var/lib/istio/envoy",
        ):
            (root / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(files / "root-cert.pem", root / "etc/certs/root-cert.pem")
        shutil.copy(files / "istio-token", root / "var/run/secrets/tokens/istio-token")
        shutil.copy(files / "mesh.yaml", root / "etc/istio/config/mesh")
        shutil.copy(template, root / "var/lib/istio/envoy/envoy_bootstrap_tmpl.json")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG"))}
        for line in (files / "cluster.env").read_text().splitlines():
            key, _, value = line.partition("=")
            env[key] = value.strip("'")
        admin, status = free_port(), free_port()
        port = mesh.xds_address.rsplit(":", 1)[1]
        env.update(
            {
                "INSTANCE_IP": instance_ip,
                "POD_NAME": "vm1",
                "POD_NAMESPACE": "vmns",
                "PROV_CERT": "./etc/certs",
                "OUTPUT_CERTS": "./etc/certs",
                "CA_ADDR": f"localhost:{port}",
                "PROXY_CONFIG": (
                    f"discoveryAddress: localhost:{port}\nproxyAdminPort: {admin}\nstatusPort: {status}\n"
                    f"binaryPath: {find_envoy_binary()}\ninterceptionMode: NONE\n"
                ),
                "DNS_PROXY_ADDR": f"{dns_address[0]}:{dns_address[1]}" if dns_address else f"127.0.0.1:{free_port()}",
                "ENVOY_STATUS_PORT": str(free_port()),
                "ENVOY_PROMETHEUS_PORT": str(free_port()),
                "CLOUD_PLATFORM": "none",
            }
        )
        cmd = [str(PILOT_AGENT), "proxy", "sidecar"]
        if resolv_conf is not None:
            (root / "resolv.conf").write_text(resolv_conf)
            mount = 'mount --bind "$0" /etc/resolv.conf && exec "$@"'
            cmd = ["unshare", "--mount", "--", "sh", "-c", mount, str(root / "resolv.conf"), *cmd]
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        with (root / "pilot-agent.log").open("wb") as log:
            proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        yield PilotAgent(proc, root, admin, status)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(root, ignore_errors=True)
