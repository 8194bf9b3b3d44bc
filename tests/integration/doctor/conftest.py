"""A VM that doctor finds healthy, built from real parts: the local mesh (real TLS and CA), a certificate it
issued, the token it minted, istioctl-style files, a real HTTP app for the probe and the real Envoy binary.

Each test breaks exactly one thing and expects exactly that line to change.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web

from tests.helpers.agent import REPO, sample_manifests, write_vm_files
from tests.helpers.mesh import MeshServer, running_mesh
from tests.helpers.net import free_port
from vm_agent.config import Config, Options, load
from vm_agent.doctor import CheckResult, DoctorOptions, run_checks
from vm_agent.identity.store import write_svid_files

NS, GROUP, SA = "vmns", "vmapp", "vmsa"
SPIFFE = f"spiffe://cluster.local/ns/{NS}/sa/{SA}"


def host_address() -> str | None:
    """A non-loopback address of this host, to advertise as the instance IP (None on a loopback-only host)."""
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family == socket.AF_INET and not entry.address.startswith("127."):
                return str(entry.address)
    return None


def foreign_address() -> str:
    """A TEST-NET address this host does not hold."""
    mine = {e.address for entries in psutil.net_if_addrs().values() for e in entries}
    return next(ip for ip in ("198.51.100.7", "203.0.113.7", "192.0.2.77") if ip not in mine)


class App:
    """The VM's application: /ready answers 200, or 503 once ``healthy`` is False."""

    def __init__(self) -> None:
        self.port = free_port()
        self.healthy = True
        self._runner: web.AppRunner | None = None

    async def _ready(self, _: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="ok" if self.healthy else "down")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ready", self._ready)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Vm:
    def __init__(self, tmp: Path, mesh: MeshServer, app: App) -> None:
        self.tmp, self.mesh, self.app = tmp, mesh, app
        self.files = write_vm_files(mesh, namespace=NS, group=GROUP, out=tmp / "files", internal_ip="127.0.0.1")
        self.state = tmp / "state"
        self.resolv = tmp / "resolv.conf"
        self.resolv.write_text("nameserver 127.0.0.53\n")
        self.instance_ip = host_address()
        self.status_port = free_port()
        self.settings: dict[str, str] = {
            "VM_AGENT_SCAN_INTERFACES": "false",
            "ISTIO_SVC_IP": self.instance_ip or "127.0.0.1",
            # No capture on this host (that is tests/system/netfilter's job, in a namespace), and a status port
            # nothing else uses, so "the agent is not running" is true.
            "PROXY_CONFIG": f"interceptionMode: NONE\nstatusPort: {self.status_port}\n",
        }
        self.issue_certificate()

    @property
    def token_path(self) -> Path:
        return self.files / "istio-token"

    def issue_certificate(self, ca: Any = None, uri: str = SPIFFE) -> None:
        """Persist a workload certificate as the agent would have; ``ca`` another MeshCA to break the chain."""
        key, chain = (ca or self.mesh.ca).issue_key_and_chain(uris=(uri,), ttl_s=3600)
        write_svid_files(self.state, key, chain, self.mesh.root_cert_pem, public_mode=0o600)

    def remove_certificate(self) -> None:
        for name in ("key.pem", "cert-chain.pem", "root-cert.pem"):
            (self.state / name).unlink(missing_ok=True)

    def set_token(self, **mint: Any) -> str:
        token = self.mesh.issuer.mint(NS, SA, **mint)
        self.token_path.write_text(token)
        return token

    def options(self) -> Options:
        return Options(
            config_dir=self.files,
            state_dir=self.state,
            resolv_conf=self.resolv,
            environ={},
            extra_env=dict(self.settings),
        )

    def config(self) -> Config:
        return load(self.options())

    async def doctor(self) -> dict[str, CheckResult]:
        results = await run_checks(self.config(), DoctorOptions())
        return {r.id: r for r in results}

    def argv(self, *extra: str) -> list[str]:
        cmd = [sys.executable, "-m", "vm_agent", "doctor", "--config-dir", str(self.files)]
        cmd += ["--state-dir", str(self.state), "--resolv-conf", str(self.resolv)]
        for key, value in self.settings.items():
            cmd += ["--set", f"{key}={value}"]
        return [*cmd, *extra]

    async def cli(self, *extra: str) -> subprocess.CompletedProcess[str]:
        """The real ``vm-agent doctor`` in a subprocess (the mesh keeps serving in this event loop meanwhile)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ISTIO_", "PROXY_CONFIG", "VM_AGENT_"))}
        return await asyncio.to_thread(
            subprocess.run, self.argv(*extra), capture_output=True, text=True, timeout=60, env=env, cwd=REPO
        )

    async def cli_json(self) -> tuple[int, dict[str, Any]]:
        proc = await self.cli("--json")
        assert proc.stdout.startswith("{"), proc.stdout + proc.stderr
        return proc.returncode, json.loads(proc.stdout)


def baseline(vm: Vm) -> dict[str, str]:
    """What a healthy VM whose agent is not started yet looks like."""
    return {
        "config": "ok",
        "token": "ok",
        "certificate": "ok",
        "istiod-name": "ok",
        "ca": "ok",
        "discovery": "ok",
        "envoy": "ok",
        "capture-rules": "skip",  # interceptionMode NONE
        "readiness-probe": "ok",
        "instance-ips": "ok" if vm.instance_ip else "warn",  # a loopback-only host can only advertise loopback
        "agent": "warn",  # not running
        "dns-capture": "skip",
    }


def statuses(results: dict[str, CheckResult]) -> dict[str, str]:
    return {check_id: r.status.value for check_id, r in results.items()}


def explain(results: dict[str, CheckResult]) -> str:
    return "\n".join(f"{r.status.value:5} {r.id:16} {r.summary} | {r.hint}" for r in results.values())


@pytest.fixture
async def vm(tmp_path: Path) -> AsyncIterator[Vm]:
    app = App()
    await app.start()
    manifests = sample_manifests(namespace=NS, group=GROUP, service_account=SA, app_port=app.port, service_port=80)
    try:
        async with running_mesh(tmp_path, manifests) as mesh:
            yield Vm(tmp_path, mesh, app)
    finally:
        await app.stop()
